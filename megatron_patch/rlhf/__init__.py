"""RLHF: PPO / GRPO losses, advantages, rewards and KL control as pure torch functions."""
