"""The trainer as a recipe (torchtune style): one Ray Train worker group for the whole run.

- `options`: what the workers are told once (`TrainLoopConfig`, built on the driver by
  `pipeline.stages.train.loop_config`) and per round (`RoundJob`), and what follows from them
  (DeepSpeed config, optimizer, LR schedule, attention kernel).
- `recipe`: `DPORecipe` (setup → train_round → save → export) and the Ray Train entry point
  that loops over the rounds the driver hands out.
- `checkpoint`: the Ray Train checkpoint protocol (save, restore, the round marker).
- `coordinator`: the actor between the driver's train stages and the worker group.
"""
