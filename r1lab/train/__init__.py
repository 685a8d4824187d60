"""Training stages: supervised (pretraining, SFT, the control) and R1-Zero reinforcement learning."""
