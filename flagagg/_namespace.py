"""The array namespace flagagg computes in for a set of arrays.

NumPy 2.1 and later implement, in ``numpy`` itself, every array-API function
flagagg calls through a namespace (``astype``, ``concat``, ``isdtype``,
``asarray(copy=)``, ``reshape(copy=)``, the ``device`` keywords). For NumPy
arrays there flagagg uses ``numpy`` directly: array_api_compat's wrapper
module runs ``from numpy import *`` on import, which loads ``numpy.ma``,
``numpy.testing`` and ``numpy.f2py`` (0.1 s of the first aggregation in every
process, a third of a short simulated run's set-up). Other arrays, and NumPy
before 2.1, get array_api_compat's namespace as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace as _compat_namespace

__all__ = ["array_namespace"]

_NUMPY_IS_STANDARD = tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 1)


def array_namespace(*arrays: Any) -> Any:
    """The namespace of ``arrays``: ``numpy`` for NumPy arrays, else array_api_compat's.

    Raises as :func:`array_api_compat.array_namespace` does for arrays of
    several libraries.
    """
    if _NUMPY_IS_STANDARD and arrays and all(type(a) is np.ndarray for a in arrays):
        return np
    return _compat_namespace(*arrays)
