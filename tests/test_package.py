"""The package's top level: every name in ``__all__`` is reachable, ``testing`` only when first asked for."""

import subprocess
import sys


def test_all_names_resolve_and_testing_is_imported_lazily():
    """``nsa_flex.testing`` had raised AttributeError though ``__all__`` lists it. A fresh process, since other
    tests import nsa_flex.testing into this one."""
    script = (
        "import sys\n"
        "import nsa_flex\n"
        "assert 'nsa_flex.testing' not in sys.modules, 'testing is imported eagerly'\n"
        "assert nsa_flex.testing.dense_attention is not None\n"
        "assert 'nsa_flex.testing' in sys.modules\n"
        "assert all(hasattr(nsa_flex, name) for name in nsa_flex.__all__)\n"
        "from nsa_flex import *\n"
        "assert testing is nsa_flex.testing\n"
        "try:\n"
        "    nsa_flex.not_a_submodule\n"
        "except AttributeError as err:\n"
        "    assert 'not_a_submodule' in str(err)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
