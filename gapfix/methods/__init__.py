"""The training methods built on the ops: BASH (gapfix.methods.bash) and RAC (gapfix.methods.rac)."""
