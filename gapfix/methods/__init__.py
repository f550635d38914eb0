"""The training methods: each one file, behind one interface (gapfix.methods.base.Method, with
its registry): SFT (gapfix.methods.sft), BASH (gapfix.methods.bash) and RAC (gapfix.methods.rac)."""
