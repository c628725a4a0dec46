# Before any module of this package imports transformers (see tandem.kernels.shadow).
from tandem.kernels.shadow import load_installed_kernels

load_installed_kernels()
