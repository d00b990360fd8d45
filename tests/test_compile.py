"""A `torch.compile`d model validated on the EMA (inductor on CPU; `tests/test_cuda.py` adds CUDA graphs on a GPU).

The validation swap exchanges values inside the model's own tensors, so a compiled graph, which reads those tensors,
sees the EMA during validation and the training weights afterwards. Each fit compiles once (a few seconds here).
"""
import warnings
import pytest
import torch
from torch import nn
from fastxtend_ema import EMACallback
from fastxtend_ema.test_utils import synth_learner, synth_model, fit_quiet, valid_loss

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')


def test_compiled_model_validates_on_the_ema():
    learn = synth_learner(cbs=EMACallback(decay=0.8), model=synth_model(norm=nn.LayerNorm))
    plain_model = learn.model
    learn.model = torch.compile(plain_model)
    fit_quiet(learn, 2)
    recorded = learn.recorder.values[-1][1]
    ema_loss, raw_loss = valid_loss(learn.model_ema, learn.dls), valid_loss(plain_model, learn.dls)
    assert abs(recorded - ema_loss) < 1e-5 and abs(raw_loss - ema_loss) > 1e-3, (recorded, ema_loss, raw_loss)
    # after validation the compiled model computes with the training weights again
    x = torch.cat([b[0] for b in learn.dls.valid])
    learn.model.eval()
    with torch.no_grad(): torch.testing.assert_close(learn.model(x), plain_model(x))
