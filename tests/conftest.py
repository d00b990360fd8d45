"""Every test leaves the process as it found it: a test that changes a global setting fails, and the random generators
are put back after each test (seeding is how tests make runs repeatable, and must not leak into the next test)."""
import random
import numpy as np
import pytest
import torch
import fastai.basics   # fastai's own modules register callbacks and patch `Learner` when first imported: do it now
import fastai.callback.all
from fastai.callback.core import defaults
from fastai.learner import Learner
from fastai.callback.core import Callback

def _settings() -> dict:
    "The global settings a test must not change"
    return dict(threads=torch.get_num_threads(), interop=torch.get_num_interop_threads(), dtype=torch.get_default_dtype(),
                grad=torch.is_grad_enabled(), defaults={k:(list(v) if isinstance(v, list) else v) for k,v in vars(defaults).items()},
                Learner=dict(vars(Learner)), Callback=dict(vars(Callback)))

def _changed(before:dict, after:dict) -> list[str]:
    out = [k for k in ('threads', 'interop', 'dtype', 'grad') if before[k] != after[k]]
    out += [f'defaults.{k}' for k,v in before['defaults'].items() if k not in after['defaults'] or after['defaults'][k] != v]
    # fastai modules imported for the first time by a test may add methods; changing or removing one is a change
    for cls in ('Learner', 'Callback'):
        out += [f'{cls}.{k}' for k,v in before[cls].items() if after[cls].get(k, None) is not v]
    return out

@pytest.fixture(autouse=True)
def unchanged_global_state():
    before = _settings()
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    yield
    random.setstate(rng[0]); np.random.set_state(rng[1]); torch.set_rng_state(rng[2])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    changed = _changed(before, _settings())
    assert not changed, f'the test changed global state: {changed}'
