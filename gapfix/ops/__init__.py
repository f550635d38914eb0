"""Fused ops. Each module holds one op's launcher, its torch.library
registration, its pure-PyTorch reference and its public function."""
