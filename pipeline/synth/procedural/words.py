"""Small word lists for needles: keys, names, places and countable items (written for Longloom)."""

from __future__ import annotations

# fmt: off
ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "bright", "calm", "clever", "copper", "crimson", "curious",
    "distant", "dusty", "eager", "early", "fierce", "frozen", "gentle", "gilded", "golden", "hidden",
    "hollow", "humble", "icy", "idle", "jagged", "keen", "lively", "lonely", "lucky", "marble", "mellow",
    "misty", "narrow", "noble", "olive", "pale", "patient", "quiet", "rapid", "restless", "rusty",
    "scarlet", "silent", "silver", "sleepy", "slow", "smoky", "steady", "stormy", "sunny", "swift", "tidy",
    "velvet", "violet", "wandering", "wild", "windy", "wise", "woolen", "young",
)

NOUNS = (
    "anchor", "apple", "arrow", "badger", "barrel", "basket", "beacon", "bell", "blanket", "boat", "bottle",
    "bridge", "bucket", "button", "cabin", "candle", "canyon", "carpet", "castle", "cedar", "chair",
    "chimney", "clock", "cloud", "comet", "compass", "cottage", "crane", "crystal", "desert", "drum",
    "eagle", "engine", "falcon", "feather", "fence", "fern", "fiddle", "flag", "forest", "fountain",
    "garden", "glacier", "goblet", "granite", "harbor", "hammer", "helmet", "heron", "island", "jacket",
    "kettle", "kite", "ladder", "lantern", "lemon", "lighthouse", "lily", "meadow", "mirror", "mountain",
    "needle", "orchard", "otter", "paddle", "parrot", "pebble", "pepper", "piano", "pillow", "planet",
    "pocket", "pond", "quarry", "quill", "rabbit", "raven", "ribbon", "river", "saddle", "sail", "scarf",
    "shovel", "signal", "skiff", "spoon", "statue", "stone", "sparrow", "teapot", "thimble", "thistle",
    "tiger", "tower", "trumpet", "tunnel", "umbrella", "valley", "violin", "wagon", "walnut", "whistle",
    "willow", "window", "wolf", "wren", "yarrow", "zephyr",
)

# Countable things for aggregation: plain, distinct nouns.
ITEMS = (
    "apricot", "axe", "bandage", "battery", "bean", "blueprint", "bolt", "bowl", "brick", "broom", "brush",
    "cable", "camera", "canvas", "carrot", "chain", "chalk", "cheese", "chisel", "coat", "coin", "collar",
    "cork", "crate", "crayon", "cup", "cushion", "dial", "dice", "drill", "envelope", "eraser", "fabric",
    "fan", "file", "flask", "flour", "folder", "fork", "funnel", "gauge", "glove", "glue", "grater",
    "hinge", "hose", "ink", "jar", "jug", "key", "knife", "ladle", "lamp", "leather", "lens", "lid",
    "magnet", "map", "marker", "mask", "mat", "match", "mop", "mug", "nail", "napkin", "net", "notebook",
    "nut", "oar", "onion", "padlock", "pail", "paint", "pan", "paper", "pear", "pen", "pencil", "pin",
    "pipe", "plank", "plate", "pliers", "plum", "pot", "potato", "pulley", "pump", "rake", "rice", "ring",
    "rope", "ruler", "salt", "sandal", "saw", "scale", "scissors", "screw", "sheet", "shelf", "shirt",
    "sieve", "soap", "sock", "sponge", "spring", "stamp", "stapler", "string", "sugar", "tape", "thread",
    "tile", "tin", "towel", "tray", "trowel", "tube", "twine", "valve", "vase", "wedge", "wheel", "wire",
    "wrench", "yeast", "zipper", "hatchet", "anvil", "beaker", "bellows", "bobbin", "buckle", "canister",
    "cleaver", "clamp", "compass", "cradle", "goggles", "harness", "lanyard", "mallet", "mortar", "muslin",
    "pestle", "pitcher", "ramekin", "satchel", "skillet", "spatula", "spindle", "stencil", "strainer",
    "tarp", "teacup", "tongs", "trivet", "whisk",
)

FIRST_NAMES = (
    "Ada", "Amos", "Anika", "Basil", "Beatrix", "Caleb", "Celia", "Dana", "Dorian", "Edith", "Elias",
    "Esme", "Felix", "Flora", "Gideon", "Greta", "Hugo", "Ines", "Ivo", "Jonah", "Juno", "Kasper", "Lena",
    "Linus", "Mabel", "Marek", "Mira", "Nadia", "Nico", "Odile", "Oskar", "Petra", "Quentin", "Rhea",
    "Rufus", "Selma", "Silas", "Tamsin", "Tobias", "Una", "Viggo", "Wanda", "Xavier", "Yara", "Zeno",
    "Agnes", "Bram", "Cora", "Dmitri", "Elsa",
)

PLACES = (
    "Alder Lane", "Birch Row", "Canal Street", "Dockside Road", "Elm Court", "Ferry Street", "Granary Lane",
    "Harbor Street", "Ivy Terrace", "Juniper Walk", "Kiln Street", "Larch Avenue", "Mill Road",
    "North Quay", "Orchard Row", "Pike Street", "Quarry Hill", "Rope Walk", "Salt Lane", "Tanner Street",
    "Upper Mews", "Vine Street", "Weaver Road", "Yew Close",
)

LOCKED_THINGS = (
    "storage unit", "bicycle lock", "garden shed", "mailbox", "locker", "tool chest", "wall safe",
    "boathouse", "cellar door", "filing cabinet",
)
# fmt: on
