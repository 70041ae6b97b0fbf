"""Training: task sampling, interaction simulation in the loop, losses and the trainer."""
