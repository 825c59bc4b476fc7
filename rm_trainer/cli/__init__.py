"""The command layer: one module per console script (train, prepare, consolidate, score, serve, eval,
export_hf, estimate), each also runnable as `python -m rm_trainer.cli.<name>`; the shared parser and
error wrapper (parser); rm-train's flags and help, generated from the config models (train_flags)."""
