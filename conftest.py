"""Settings for every test folder of this repository.

roi_ops builds its C++ autograd node (roi_ops.native) in the background at the first call that
needs a gradient, and switches to it when the build is done; tests keep to one path unless they
choose (tests/test_native_autograd.py builds it and runs both). ROI_OPS_NATIVE=1 in the
environment runs every test with the automatic build on.
"""

import os

os.environ.setdefault("ROI_OPS_NATIVE", "0")
