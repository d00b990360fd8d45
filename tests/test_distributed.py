"""Distributed training with the EMA: fastai DDP and FSDP2, each run once on 2 gloo processes (CPU) by a script in
tests/distributed/ launched with `torch.distributed.run`, and compared with one process that sees the same global batches.

DDP: the EMA shadows the plain module, equals the single-process EMA and is the same on every rank, is validated on,
is checkpointed by rank 0 and loaded on every rank, and its step runs no collective; BatchNorm buffers follow DDP's
broadcast as nbs/06_distributed.ipynb describes. FSDP2: `ShardedModelEMA` holds each rank's shards of the
single-process EMA, with and without fastai. Two defects these tests found (an EMA left averaging old storage after
accelerate moved the model, a load racing rank 0's save) are fixed in the library; the `*_fixed` scenarios of the
workers, which patched the fixes in before they landed, now run the same code as the plain ones."""
import os, socket, subprocess, sys, tempfile
from pathlib import Path
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT/'tests'/'distributed'
sys.path.insert(0, str(DIST))
import common   # the workers' models and data (torch only)

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason='torch.distributed with gloo is needed')

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def launch(script:str, out:Path, timeout=180) -> list[dict]:
    "Run tests/distributed/`script` on 2 local processes; each rank's results"
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(_free_port()), str(DIST/script), str(out)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    files = [out/f'rank{r}.pt' for r in range(2)]
    res = [torch.load(f, weights_only=False) for f in files if f.exists()]
    errors = [r['error'] for r in res if 'error' in r]
    if p.returncode or len(res) < 2 or errors:
        pytest.fail(f'{script}: rc {p.returncode}\n' + '\n'.join(errors) + f'\n{p.stderr[-5000:]}')
    return res

def assert_close(a:dict, b:dict, eps=1e-6):
    assert list(a) == list(b), (list(a), list(b))
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k].double(), b[k].double(), atol=eps, rtol=0, msg=k)

def assert_equal(a:dict, b:dict):
    assert list(a) == list(b), (list(a), list(b))
    for k in a: assert torch.equal(a[k], b[k]), k

## fastai DDP

@pytest.fixture(scope='module')
def ddp(tmp_path_factory):
    pytest.importorskip('accelerate')
    out = tmp_path_factory.mktemp('ddp')
    return out, launch('ddp_fastai.py', out)

@pytest.fixture(scope='module')
def single():
    "One process, the same model and initial weights as DDP's rank 0, over DDP's global batches (both ranks' rows)"
    from fastai.basics import Learner, DataLoaders, DataLoader, MSELossFlat, SGD
    from fastxtend_ema import EMACallback
    x, y = common.xy(); ds = list(zip(x, y))
    # DDP step i (bs 16 per rank): rank 0 gets training rows 16i..16i+15, rank 1 rows 48+16i..48+16i+15
    order = [j for i in range(3) for r in range(2) for j in range(48*r+16*i, 48*r+16*i+16)]
    dls = DataLoaders(DataLoader([ds[j] for j in order], bs=32, shuffle=False), DataLoader(ds[96:], bs=32), device='cpu')
    learn = Learner(dls, common.mlp(seed=0), loss_func=MSELossFlat(), opt_func=SGD, lr=0.05,
                    cbs=EMACallback(decay=0.9, validate_ema='both'), path=tempfile.mkdtemp(prefix='fxema_'))
    with learn.no_bar(), learn.no_logging(): learn.fit(2)
    return learn

@pytest.fixture(scope='module')
def single_bema():
    "`single` with BEMACallback"
    from fastai.basics import Learner, DataLoaders, DataLoader, MSELossFlat, SGD
    from fastxtend_ema import BEMACallback
    x, y = common.xy(); ds = list(zip(x, y))
    order = [j for i in range(3) for r in range(2) for j in range(48*r+16*i, 48*r+16*i+16)]
    dls = DataLoaders(DataLoader([ds[j] for j in order], bs=32, shuffle=False), DataLoader(ds[96:], bs=32), device='cpu')
    learn = Learner(dls, common.mlp(seed=0), loss_func=MSELossFlat(), opt_func=SGD, lr=0.05,
                    cbs=BEMACallback(validate_ema='both'), path=tempfile.mkdtemp(prefix='fxema_'))
    with learn.no_bar(), learn.no_logging(): learn.fit(2)
    return learn

def valid_loss(state:dict) -> float:
    m = common.mlp(); m.load_state_dict(state)
    x, y = common.xy()
    with torch.no_grad(): return nn.functional.mse_loss(m(x[96:]), y[96:]).item()

def test_ema_follows_the_plain_module(ddp):
    _, ranks = ddp
    names = list(common.mlp().state_dict())
    for res in ranks:
        for key in ('fit_cbs', 'learner_cbs_fixed', 'bn'):
            rec = res[key]
            assert rec['shadows_inner'], key             # the EMA's model is the module inside DDP
            assert not any(k.startswith('module.') for k in rec['ema']), key
        assert list(res['fit_cbs']['ema']) == names
        # given to fit(), the callback builds the EMA after the DDP wrap; given to the Learner, before it
        assert res['fit_cbs']['built_on'] == 'DistributedDataParallel'
        assert res['learner_cbs']['built_on'] == res['learner_cbs_fixed']['built_on'] == 'Sequential'

def test_ddp_ema_equals_single_process_and_is_the_same_on_every_rank(ddp, single):
    _, (r0, r1) = ddp
    ref = {k:v.detach() for k,v in single.model_ema.state_dict().items()}
    assert_close(r0['fit_cbs']['ema'], ref)
    assert_close(r0['fit_cbs']['model'], {k:v.detach() for k,v in single.model.state_dict().items()})
    assert_equal(r0['fit_cbs']['ema'], r1['fit_cbs']['ema'])   # bit for bit

def test_ema_built_before_the_ddp_wrap_equals_single_process(ddp, single):
    _, (r0, r1) = ddp
    ref = {k:v.detach() for k,v in single.model_ema.state_dict().items()}
    for res in (r0, r1): assert_close(res['learner_cbs']['ema'], ref)

def test_ema_built_before_the_ddp_wrap_in_a_second_scenario(ddp, single):
    _, (r0, r1) = ddp
    ref = {k:v.detach() for k,v in single.model_ema.state_dict().items()}
    for res in (r0, r1): assert_close(res['learner_cbs_fixed']['ema'], ref)
    assert_equal(r0['learner_cbs_fixed']['ema'], r1['learner_cbs_fixed']['ema'])

def test_ema_follows_a_parameter_whose_storage_was_replaced():
    "The bug above in one process: `Module.to` to a device that compares unequal ('cpu' vs 'cpu:0') replaces `p.data`"
    from fastxtend_ema.averager import ModelEMA
    m = nn.Linear(2, 2)
    ema = ModelEMA(m)
    m.to('cpu:0')   # what accelerate's prepare_model does on CPU (its device is cpu:0)
    with torch.no_grad(): m.weight.add_(1.)
    ema.update(0.)   # decay 0: the EMA is the model
    assert torch.equal(ema.module.weight, m.weight)

def test_validation_on_ema_weights(ddp, single):
    _, ranks = ddp
    ref = [list(map(float, v)) for v in single.recorder.values]
    for res in ranks:
        for key in ('fit_cbs', 'learner_cbs_fixed', 'resume'):
            rec = res[key]
            assert rec['names'] == ['epoch', 'train_loss', 'valid_loss', 'ema_valid_loss', 'time']
            torch.testing.assert_close(torch.tensor(rec['values'][-1][1:]), torch.tensor(ref[-1][1:]), atol=1e-4, rtol=0)
        # the last EMA column is the loss of the final EMA on the whole validation set (both ranks' halves)
        torch.testing.assert_close(res['fit_cbs']['values'][-1][2], valid_loss(res['fit_cbs']['ema']), atol=1e-4, rtol=0)
        assert res['fit_cbs']['values'][-1][2] != pytest.approx(res['fit_cbs']['values'][-1][1], abs=1e-2)   # not the raw weights'
        assert len(res['fit_cbs']['values']) == 2 and res['fit_cbs']['values'] == ranks[0]['fit_cbs']['values']

def test_checkpoint_written_by_rank_0_loaded_on_every_rank(ddp):
    out, (r0, r1) = ddp
    # SaveModelCallback(every_epoch=True) during the DDP fit: every rank calls learn.save, each with its own folder
    assert r0['fit_cbs']['files'] == ['model_0.ema.pth', 'model_0.pth', 'model_1.ema.pth', 'model_1.pth']
    assert r1['fit_cbs']['files'] == []
    saved = torch.load(out/'path0'/'models'/'model_1.ema.pth', weights_only=True)
    assert_equal(saved['tensors'], r0['fit_cbs']['ema'])
    epoch0 = torch.load(out/'path0'/'models'/'model_0.ema.pth', weights_only=True)['tensors']
    for res in (r0, r1):
        assert_equal(res['resume']['loaded_ema'], epoch0)            # learn.load on every rank
        assert_close(res['resume']['ema'], r0['fit_cbs']['ema'])     # resumed from epoch 0 = the uninterrupted run
    # after fit, learn.model_ema (no callback left) is saved by rank 0 and loaded on every rank, buffers included
    bn0, bn1 = r0['bn_novalid'], r1['bn_novalid']
    assert bn0['files'] == ['bn.ema.pth', 'bn.pth'] and bn1['files'] == []
    assert_equal(bn0['loaded_ema'], bn0['ema']); assert_equal(bn1['loaded_ema'], bn0['ema'])

def test_load_right_after_save_on_every_rank(ddp):
    _, ranks = ddp
    for res in ranks: assert res['race']['loaded'] is not None and torch.equal(res['race']['loaded']['0.weight'], res['race']['written']['0.weight'])

def test_load_right_after_save_with_a_barrier_first(ddp):
    _, ranks = ddp
    for res in ranks: assert_equal(res['race_fixed']['loaded'], res['race_fixed']['written'])

def _reference(rec) -> dict:
    "float64 EMA (decay 0.9) of a rank's own state after each of its optimizer steps"
    ema = {k:v.clone() for k,v in rec['initial'].items() if k != '1.num_batches_tracked'}   # the EMA copies the counter
    out = []
    for s in rec['steps']:
        for k in ema: ema[k] = 0.9*ema[k] + 0.1*s[k]
        out.append({k:v.clone() for k,v in ema.items()})
    return out

def test_batchnorm_buffers(ddp):
    _, (r0, r1) = ddp
    bufs, params = ('1.running_mean', '1.running_var'), ('0.weight', '1.weight', '1.bias', '3.weight')
    for key in ('bn', 'bn_novalid'):
        a, b = r0[key], r1[key]
        assert a['broadcast_buffers'] is True and len(a['steps']) == 6
        # DDP copies rank 0's buffers into every rank before a training forward that follows a training forward
        # (the first training forward after validation, a no-grad forward, does not: step 3)
        for i in (0, 1, 2, 4, 5): assert torch.equal(a['pre_forward_running_mean'][i], b['pre_forward_running_mean'][i]), i
        # ... then each rank updates them with its own batch
        assert all(not torch.equal(s['1.running_mean'], t['1.running_mean']) for s,t in zip(a['steps'], b['steps']))
        # during training, each rank's EMA is the EMA of its own buffers; parameters' EMA is the same on every rank
        for res in (a, b):
            for got,want in zip(res['ema_steps'][:3], _reference(res)[:3]): assert_close({k:got[k] for k in want}, want)
        assert not torch.equal(a['ema_steps'][2]['1.running_mean'], b['ema_steps'][2]['1.running_mean'])
        for k in params: assert torch.equal(a['ema'][k], b['ema'][k]), k
    # validation on the EMA weights (swapped in) runs DDP's broadcast into the EMA's buffers: after every epoch each
    # rank holds rank 0's EMA buffers; without it they stay each rank's own to the end
    for e in range(2): assert_equal(r1['bn']['ema_epochs'][e], r0['bn']['ema_epochs'][e])
    assert_close({k:r1['bn']['ema'][k] for k in bufs}, {k:_reference(r0['bn'])[-1][k] for k in bufs})
    for res in (r0, r1):
        assert_close({k:res['bn_novalid']['ema'][k] for k in bufs}, {k:_reference(res['bn_novalid'])[-1][k] for k in bufs})
    assert not torch.equal(r0['bn_novalid']['ema']['1.running_mean'], r1['bn_novalid']['ema']['1.running_mean'])
    # broadcast_buffers_ gives every rank rank 0's in memory
    assert_equal(r1['bn_novalid']['ema_broadcast'], r0['bn_novalid']['ema'])

def test_no_collective_per_ema_step(ddp):
    _, ranks = ddp
    for res in ranks:
        for key in ('fit_cbs', 'learner_cbs', 'learner_cbs_fixed', 'bn', 'bn_novalid'):
            rec = res[key]
            assert rec['ema_step_ops'] == [[]]*6, key
            # the counter sees DDP's own communication in the same batches: the gradient all-reduce
            assert all('c10d.allreduce_.default' in ops for ops in rec['batch_ops']), key
        assert any('c10d.broadcast_.default' in ops for ops in res['bn']['batch_ops'])   # and the buffer broadcast

## FSDP2

@pytest.fixture(scope='module')
def fsdp(tmp_path_factory):
    pytest.importorskip('torch.distributed.fsdp', reason='FSDP2 (fully_shard) is needed')
    from torch.distributed import fsdp as _fsdp
    if not hasattr(_fsdp, 'fully_shard'): pytest.skip('this torch has no FSDP2 (fully_shard)')
    return launch('fsdp2.py', tmp_path_factory.mktemp('fsdp2'))

def _shard(t:torch.Tensor, rank:int) -> torch.Tensor:
    "FSDP2's dim-0 shard of a full tensor (torch.chunk layout)"
    chunks = t.chunk(2, dim=0) if t.dim() else (t, t)
    return chunks[rank] if rank < len(chunks) else t[:0]

def test_fsdp2_picks_the_sharded_ema(fsdp):
    for res in fsdp: assert res['types'] == ('ModelEMA', 'ShardedModelEMA')

def test_fsdp2_ema_shards_are_slices_of_the_single_process_ema(fsdp):
    for rank,res in enumerate(fsdp):
        assert_close(res['model_local'], {k:_shard(v, rank) for k,v in res['model_ref'].items()})   # training agrees
        assert_close(res['ema_local'], {k:_shard(v, rank) for k,v in res['ema_ref'].items()})
        assert {t.dtype for t in res['ema_local'].values()} == {torch.float32}

def test_fsdp2_memory_is_a_rank_share(fsdp):
    full = fsdp[0]['full_nbytes']
    assert sum(res['ema_nbytes'] for res in fsdp) == full   # each element once, on one rank
    for rank,res in enumerate(fsdp):
        assert res['ema_nbytes'] == sum(_shard(v, rank).numel()*v.element_size() for v in res['ema_ref'].values())
        assert res['ema_storage_nbytes'] == res['ema_nbytes']   # no full-size storage behind the shards
        assert res['big_nbytes'] == 4*(64*256 + 256 + 256*64 + 64)//2

def test_fsdp2_no_collective_per_update(fsdp):
    for res in fsdp:
        assert res['update_ops'] == [[]]*8
        for ops in res['step_ops']:   # the counter sees FSDP's all-gathers and reduce-scatters in the training step
            assert 'c10d._allgather_base_.default' in ops and 'c10d._reduce_scatter_base_.default' in ops

def test_fsdp2_validation_on_ema_shards(fsdp):
    for res in fsdp:
        torch.testing.assert_close(res['valid_out'], res['valid_ref'], atol=1e-6, rtol=0)
        assert res['restored']   # and training went on from the training weights: the shards above agree at the end

def test_fsdp2_full_state_dict_and_plain_module(fsdp):
    names = list(common.ln_model().state_dict())
    for res in fsdp:
        assert list(res['state_dict']) == names
        assert_close(res['state_dict'], res['ema_ref'])
        assert any('all_gather' in op for op in res['state_dict_ops'])   # gathered when asked, and only then
        assert res['module_type'] == ('Sequential', False, False, False)  # plain class, no DTensor, not sharded, eval
        assert res['module_again']
        for k in ('module_out', 'fresh_out'): torch.testing.assert_close(res[k], res['module_ref'], atol=1e-6, rtol=0)

def test_fsdp2_load_full_state_keeps_each_rank_slice(fsdp):
    for rank,res in enumerate(fsdp):
        assert res['load_ops'] == []
        assert_equal(res['loaded_local'], {k:_shard(v, rank) for k,v in res['ema_ref'].items()})
        torch.testing.assert_close(res['copied_out'], res['module_ref'], atol=1e-6, rtol=0)   # copy_to_model

def test_fsdp2_bf16_model_fp32_ema(fsdp):
    for rank,res in enumerate(fsdp):
        assert {t.dtype for n,t in res['bf16_local'].items() if n != '3.bias'} == {torch.float32}
        assert_equal(res['bf16_local'], {k:_shard(v, rank) for k,v in res['bf16_ref'].items()})

def test_fsdp2_plain_module_keeps_the_hooks_the_model_owns(fsdp):
    "A skip connection fed by a hook the model owns: the plain module calls its own copy of the hook, and no FSDP hook"
    for res in fsdp:
        assert res['skip_hooks'] == [('', 0, 0), ('body', 0, 1), ('head', 0, 0)]
        assert isinstance(res['skip_out'], torch.Tensor), res['skip_out']
        torch.testing.assert_close(res['skip_out'], res['skip_ref'], atol=1e-6, rtol=0)

@pytest.fixture(scope='module')
def fsdp_fastai(tmp_path_factory, fsdp):
    out = tmp_path_factory.mktemp('fsdp2_fastai')
    return out, launch('fsdp2_fastai.py', out)

def test_fsdp2_with_fastai(fsdp_fastai):
    "EMACallback on a fully_shard'ed model: `make_averager` gives it a ShardedModelEMA, and `learn.save` gathers the EMA on every rank"
    out, (r0, r1) = fsdp_fastai
    for res in (r0, r1):
        assert res['averager'] == 'ShardedModelEMA' and res['model_ema_type'] == 'Sequential'
        assert res['update_ops'] == [[]]*6
        assert_close(res['ema'], res['ref'])
        assert res['values'][-1][2] == pytest.approx(res['ref_ema_valid_loss'], abs=1e-5)   # validated on the EMA shards
    assert_equal(r0['ema'], r1['ema'])
    assert r0['files'] == ['fsdp.ema.pth', 'fsdp.pth'] and r1['files'] == []
    assert_equal(torch.load(out/'path0'/'models'/'fsdp.ema.pth', weights_only=True)['tensors'], r0['ema'])


def test_posthoc_ema_under_ddp(ddp):
    "Every rank tracks the same power-function EMAs; only rank 0 writes the snapshots, and both know them"
    _, (r0, r1) = ddp
    a, b = r0['posthoc'], r1['posthoc']
    assert a['snapshots'] == b['snapshots'] and len(a['snapshots']) == 3   # steps 2, 4 (end of the 2nd epoch: 3 per epoch)
    assert a['files'] == [n for _, n in a['snapshots']] and b['files'] == []
    assert a['theta_0'] and not b['theta_0']
    for ea, eb in zip(a['emas'], b['emas']): assert_close(ea, eb)

def test_posthoc_ema_refuses_fsdp2(fsdp_fastai):
    for res in fsdp_fastai[1]:
        assert res['posthoc_refused'] and 'does not support a fully_shard (FSDP2) model' in res['posthoc_refused']

def test_bema_under_ddp_equals_single_process_on_every_rank_and_is_checkpointed(ddp, single_bema):
    "BEMA on 2 DDP processes: theta_0 is rank 0's weights (taken after the wrap), the BEMA and its EMA equal one process's"
    _, (r0, r1) = ddp
    ref = {k:v.detach() for k,v in single_bema.model_ema.state_dict().items()}
    assert_close(r0['bema']['ema'], ref)
    assert_close(r0['bema']['plain'], {k:v.detach() for k,v in single_bema.bema.ema_module.state_dict().items()})
    assert_equal(r0['bema']['ema'], r1['bema']['ema'])   # bit for bit
    assert_equal(r0['bema']['plain'], r1['bema']['plain'])
    ref_vals = [list(map(float, v)) for v in single_bema.recorder.values]
    for res in (r0, r1):
        assert res['bema']['names'] == ['epoch', 'train_loss', 'valid_loss', 'ema_valid_loss', 'time']
        torch.testing.assert_close(torch.tensor(res['bema']['values'][-1][1:]), torch.tensor(ref_vals[-1][1:]), atol=1e-4, rtol=0)
        torch.testing.assert_close(res['bema']['values'][-1][2], valid_loss(res['bema']['ema']), atol=1e-4, rtol=0)
        assert_equal(res['bema']['loaded'], r0['bema']['ema'])   # rank 0's file, loaded on every rank
        assert res['bema']['files'] == ['bema.bema.pth', 'bema.pth']
