"""The run folder: its lock, checkpoint files and manifest, resume rules, summary.json, model.json and what
``model.init_from`` reads."""
