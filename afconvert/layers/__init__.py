"""Alias-free layers, usable on their own: ideal (FFT) resampling and shifts, circular and alias-free
convolutions and pooling, polynomial activations (plain, alias-free, scale-equivariant), the CHW
LayerNorm, and the up-/down-sampling linears. They import nothing from the rest of afconvert."""
