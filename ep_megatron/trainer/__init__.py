"""The pretraining job: the MoE GPT, data, the training loop, reports and the command line."""
