import numpy as np
import numpy.typing as npt

def bandwidth_probe(buf: npt.NDArray[np.float32], n_threads: int = 0, *,
                    read: bool = True, out: npt.NDArray[np.float32] | None = None,
                    square: bool = False) -> tuple[float | None, float]: ...
