"""Procedural long-range-dependency samples: generators, chat assembly, the flow stage and a scorer.

Generators (versioned steps): hash_chain@1 (Magic's HashHop), multi_needle@1, variable_tracking@1 and
aggregation@1 and frequent_words@1 (after NVIDIA's RULER), adversarial@1 (near-miss keys,
contradicting updates, prefix-sharing decoy chains), qa@1 (RULER's qa_1/qa_2 over a QA dataset the user names),
icl@1 (many-shot in-context learning over a labelled dataset). Samples are token-exact chats built on real packed rows.
"""

from __future__ import annotations

from pipeline.synth.procedural.adversarial import Adversarial
from pipeline.synth.procedural.aggregation import Aggregation
from pipeline.synth.procedural.base import Draft, Generator, Needle, Query
from pipeline.synth.procedural.frequent_words import FrequentWords
from pipeline.synth.procedural.hash_chain import HashChain
from pipeline.synth.procedural.icl import ManyShotICL
from pipeline.synth.procedural.needles import MultiNeedle
from pipeline.synth.procedural.qa import QA
from pipeline.synth.procedural.variables import VariableTracking

GENERATORS: dict[str, Generator] = {
    g.task: g
    for g in (
        HashChain(),
        MultiNeedle(),
        VariableTracking(),
        Aggregation(),
        FrequentWords(),
        Adversarial(),
        QA(),
        ManyShotICL(),
    )
}

__all__ = ["GENERATORS", "Draft", "Generator", "Needle", "Query"]
