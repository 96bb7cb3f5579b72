KERNELS: dict = {}
WEIGHTED_KERNELS: dict = {}
