"Every notebook in nbs/ executed by nbdev's test runner, one pytest test each."
import os
from pathlib import Path
import pytest
from nbdev.test import test_nb as run_notebook   # renamed so pytest does not collect it

NBS = Path(__file__).resolve().parents[1]/'nbs'
NOTEBOOKS = sorted(p for p in NBS.rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts and not p.name.startswith('_'))
# Cells flagged `slow` or `cuda` are skipped unless named in FASTXTEND_EMA_TEST_FLAGS (e.g. "slow cuda").
FORCE = set(os.environ.get('FASTXTEND_EMA_TEST_FLAGS', '').split())
SKIP = [f for f in ('slow', 'cuda', 'multicuda') if f not in FORCE]

def test_found_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {'index.ipynb', '00_update.ipynb', '01_averager.ipynb', '02_decay.ipynb', '05_callback.ipynb', '97_test_utils.ipynb'} <= names, names

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[str(p.relative_to(NBS)) for p in NOTEBOOKS])
def test_notebook(nb):
    ok, secs = run_notebook(nb, skip_flags=SKIP, force_flags=sorted(FORCE))
    assert ok, f'{nb.name} failed (traceback above, on stderr)'
