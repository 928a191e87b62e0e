"""SiT-down U-Net with U-REPA alignment, trained from a feature cache (see the trainer issue)."""
