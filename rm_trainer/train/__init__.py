"""The training run (run) and the owners it hands work to: the set-up of the engine, the packing check and
the sampler (build), the step (step), evaluation (evaluator), checkpoints and resume (checkpointer),
metrics (logger), the optimizer (optim), the DeepSpeed JSON (ds_config), the memory estimate (estimate)
and the engine (engine: the only module that imports deepspeed and torch.distributed)."""
