"""What a run leaves for people: the audit tables, the dataset card, plots, the run report, publishing
to a hub, and exports to the formats trainers read.
"""
