"""SiT-down U-Net with U-REPA alignment, trained from a feature cache: models, losses, the step and the loop."""
