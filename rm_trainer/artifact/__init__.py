"""What a run leaves on disk and how it is read back: checkpoint files (checkpoint_files: manifest,
commit, rotation, resume target), the offline ZeRO merge (zero_merge: reads DeepSpeed's files, imports no
deepspeed), the `reward.pt` format (format), consolidation and its verification (consolidate), LoRA's
merge and adapter export (lora), loading (load) and the HF export (hf_export)."""
