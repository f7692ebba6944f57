"""What a run leaves for people: the audit tables, the dataset card, plots, the run report and
publishing to a hub.
"""
