"""Time one EMA step of fastxtend_ema and its peers on real model shapes, against the one-pass memory bound.

Models are built from `transformers` configs and `timm` names with random weights (nothing is downloaded). The bound is one fp32
`lerp_` over contiguous buffers with as many elements as fastxtend_ema averages (12 bytes moved per element), for an
fp32 model and for a bf16 model alike (the ideal mixed step moves 10: the bf16 model read, the fp32 EMA read and
written). Every implementation runs on prebuilt state, round-robin, so the table shows the per-step cost a training
loop pays; the bytes each step allocates are the profiler's (each operator's own allocations). With `--dtype bf16`,
the rows are fastxtend_ema's two mixed kernels (staging, compiled: its compile time and recompiles are reported), the
`mul_`+`add_` step they replace, and the peers, which keep a bf16 EMA. Prints a markdown table, writes it (.md), JSON and a PNG;
`benchmarks/results/` keeps the runs the README quotes.

    python benchmarks/ema_step.py                       # CPU, fp32 models, all eight
    python benchmarks/ema_step.py --models 'ResNet-50 (timm)' 'ConvNeXt-T (timm)'   # some of them
    python benchmarks/ema_step.py --dtype bf16          # bf16 models, fp32 EMA
    python benchmarks/ema_step.py --quick               # smoke test: tiny models, few repeats (CI runs this)
    python benchmarks/ema_step.py --device cuda --dtype bf16
"""
import argparse, json, platform, shlex, statistics, sys, time, types, warnings
from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).resolve().parent/'out'

# ---------------------------------------------------------------- models

def _transformers_models():
    from transformers import (ResNetConfig, ResNetModel, ConvNextConfig, ConvNextModel, ViTConfig, ViTModel,
                              DebertaV2Config, DebertaV2Model, GPT2Config, GPT2Model)
    return {
        'ResNet-50': lambda: ResNetModel(ResNetConfig()),
        'ConvNeXt-T': lambda: ConvNextModel(ConvNextConfig()),
        'ViT-S/16': lambda: ViTModel(ViTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536)),
        'DeBERTa-v3-base': lambda: DebertaV2Model(DebertaV2Config(
            vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            relative_attention=True, position_buckets=256, norm_rel_ebd='layer_norm', share_att_key=True,
            pos_att_type=['p2c', 'c2p'], max_relative_positions=-1, position_biased_input=False)),
        'GPT-2-medium': lambda: GPT2Model(GPT2Config(n_embd=1024, n_layer=24, n_head=16)),
    }

def _timm_models():
    "The backbones fastai users take from timm (`vision_learner(dls, 'convnext_tiny')`), as timm builds them"
    def make(name):
        def build():
            import timm
            return timm.create_model(name, pretrained=False)
        return build
    return {'ResNet-50 (timm)': make('resnet50'), 'ConvNeXt-T (timm)': make('convnext_tiny'),
            'EfficientNet-B0 (timm)': make('efficientnet_b0')}

def _all_models(): return {**_transformers_models(), **_timm_models()}

def _tiny_models():
    def mlp(): return nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128))
    def cnn(): return nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3),
                                    nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    return {'MLP-100k': mlp, 'CNN-20k': cnn}

# ---------------------------------------------------------------- implementations
# Each maker takes (model, decay) and returns a step function; the state it needs is built once, outside the timing.

def make_bound(model, decay, avg_numel):
    "One fp32 lerp_ over contiguous buffers of the averaged element count: 12 bytes moved per element"
    p = next(model.parameters())
    e,m = torch.zeros(avg_numel, device=p.device),torch.ones(avg_numel, device=p.device)
    return lambda: e.lerp_(m, 1 - decay)

def make_copy(model, decay, avg_numel):
    "One fp32 copy_ over contiguous buffers of the averaged element count: the copy bandwidth (8 bytes per element)"
    p = next(model.parameters())
    e,m = torch.zeros(avg_numel, device=p.device),torch.ones(avg_numel, device=p.device)
    return lambda: e.copy_(m)

def make_ours(model, decay, shared):
    from fastxtend_ema.averager import ModelEMA
    ema = shared['ema'] = ModelEMA(model)
    return lambda: ema.update(decay)

def make_ours_compiled(model, decay, shared):
    "The compiled mixed step; its first call (the compile) is timed here, and the compiles of later new weights counted"
    from fastxtend_ema.averager import ModelEMA
    import torch._dynamo.utils as du
    ema = ModelEMA(model, compile=True, module=shared['ema'].module)
    if ema.avg.mixed is None: return None   # an fp32 model has no mixed step
    graphs = lambda: du.counters['stats']['unique_graphs']
    t, g0 = time.perf_counter(), graphs()
    ema.update(decay)
    shared['compile_s'] = time.perf_counter() - t
    for d in (0.9, 0.99, 0.5, decay): ema.update(d)   # new weights every step: a recompile would show here
    shared['recompiles'] = graphs() - g0 - 1
    shared['compiled_mode'] = ema.avg.mixed.mode
    return lambda: ema.update(decay)

def make_mul_add(model, decay, shared):
    "The mixed step this package used before MixedLerp: `_foreach_mul_` + `_foreach_add_`"
    groups = shared['ema'].avg.groups
    if 'mixed' not in groups: return None
    e, m = groups['mixed']
    def step(): torch._foreach_mul_(e, decay); torch._foreach_add_(e, m, alpha=1 - decay)
    return step

def make_ours_loop(model, decay, shared):
    from fastxtend_ema.averager import ModelEMA
    ema = ModelEMA(model, foreach=False, module=shared['ema'].module)   # same EMA tensors, per-tensor loop
    return lambda: ema.update(decay)

def make_foreach_lerp(model, decay, shared):
    groups = shared['ema'].avg.groups
    if set(groups) != {'lerp'}: return None   # lerp_ refuses mixed dtypes
    e, m = groups['lerp']
    return lambda: torch._foreach_lerp_(e, m, 1 - decay)

def make_fastxtend(model, decay, shared=None):
    "fastxtend 0.1.7's EMACallback(foreach=True) step, driven through its own before_fit/after_batch"
    from fastxtend.callback.ema import EMACallback as FxEMA
    cb = FxEMA(decay=decay, foreach=True)
    learn = types.SimpleNamespace(model=model, n_epoch=1, model_ema=None)
    cb.learn = learn
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); cb.before_fit()
    cb._do_ema = True
    return cb.after_batch

def make_averaged_model(model, decay, shared=None):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    avg.update_parameters(model)   # the first call only copies
    return lambda: avg.update_parameters(model)

def make_ema_pytorch(model, decay, shared=None):
    from ema_pytorch import EMA
    ema = EMA(model, beta=decay, update_after_step=0, update_every=1, allow_different_devices=False)
    ema.update(); ema.update()   # past its initial copy
    return ema.update

def make_timm(model, decay, shared=None):
    from timm.utils.model_ema import ModelEmaV3
    ema = ModelEmaV3(model, decay=decay)
    return lambda: ema.update(model)

IMPLS = {
    'fastxtend_ema': make_ours,
    'fastxtend_ema (compiled)': make_ours_compiled,
    'mul_+add_ (previous mixed step)': make_mul_add,
    'fastxtend_ema (loop)': make_ours_loop,
    'foreach_lerp_ (prebuilt lists)': make_foreach_lerp,
    'fastxtend 0.1.7 (foreach)': make_fastxtend,
    'torch AveragedModel': make_averaged_model,
    'ema-pytorch': make_ema_pytorch,
    'timm ModelEmaV3': make_timm,
}

# ---------------------------------------------------------------- timing

def _sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()

def time_steps(steps, device, reps, warmup=2):
    "Median seconds per call of each step, measured round-robin so that drift on the machine hits all alike"
    for step in steps.values():
        for _ in range(warmup): step()
    _sync(device)
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, step in steps.items():
            t = time.perf_counter(); step(); _sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}

def step_alloc_bytes(step, device):
    "Bytes allocated (and not from a cache) by one call of `step`: CUDA peak growth, or CPU allocations seen by the profiler"
    if device.type == 'cuda':
        _sync(device); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
        step(); _sync(device)
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof: step()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())   # self: an allocation counted once

def averaged_numel(model):
    from fastxtend_ema.update import select_tensors, named_tensors
    avg, _ = select_tensors(model)
    t = named_tensors(model)
    return sum(t[n].numel() for n in avg)

# ---------------------------------------------------------------- main

def run(models, impls, device, dtype, reps, decay=0.9998):
    rows = []
    for name, build in models.items():
        torch.manual_seed(0)
        model = build().to(device)
        if dtype == 'bf16': model = model.to(torch.bfloat16)
        n = averaged_numel(model)
        r = dict(model=name, params_m=round(n/1e6, 2), n_tensors=len(list(model.parameters())) + len(list(model.buffers())))
        steps, shared = {'bound': make_bound(model, decay, n), 'copy': make_copy(model, decay, n)}, {}
        for impl in ['fastxtend_ema'] + [i for i in impls if i != 'fastxtend_ema']:
            try: step = IMPLS[impl](model, decay, shared)
            except ImportError as e:
                r[impl + ' (why)'] = f'not importable: {e}'.splitlines()[0]; continue
            if step is not None: steps[impl] = step
        t = time_steps(steps, device, reps)
        r['bound_us'],r['copy_us'] = t.pop('bound')*1e6,t.pop('copy')*1e6
        for impl in impls: r[impl] = t[impl]*1e6 if impl in t else None
        for k in ('compile_s', 'recompiles', 'compiled_mode'): r[k] = shared.get(k)
        for impl in ('fastxtend_ema', 'fastxtend_ema (compiled)', 'mul_+add_ (previous mixed step)'):
            if impl in steps: r[f'{impl} alloc bytes'] = step_alloc_bytes(steps[impl], device)
        del steps, shared
        if device.type == 'cuda': torch.cuda.empty_cache()
        rows.append(r)
        print(f'  {name}: done', file=sys.stderr)
        del model
    return rows

def table(rows, impls):
    head = '| implementation | ' + ' | '.join(r['model'] for r in rows) + ' |'
    lines = [head, '|---|' + '---:|'*len(rows)]
    lines.append('| one-pass bound (µs) | ' + ' | '.join(f"{r['bound_us']:,.0f}" for r in rows) + ' |')
    left_out = [i for i in impls if all(r.get(i) is None for r in rows)]
    for impl in [i for i in impls if i not in left_out]:
        cells = []
        for r in rows:
            v = r.get(impl)
            cells.append('n/a' if v is None else f"{v:,.0f} ({v/r['bound_us']:.2f}x)")
        lines.append(f'| {impl} | ' + ' | '.join(cells) + ' |')
    for impl in ('fastxtend_ema', 'fastxtend_ema (compiled)', 'mul_+add_ (previous mixed step)'):
        if any(f'{impl} alloc bytes' in r for r in rows):
            lines.append(f'| {impl}: bytes allocated per step | ' + ' | '.join(f"{r[f'{impl} alloc bytes']:,}" if f'{impl} alloc bytes' in r else 'n/a' for r in rows) + ' |')
    lines.append('| copy bandwidth: fp32 `copy_` (µs) | ' + ' | '.join(f"{r['copy_us']:,.0f}" for r in rows) + ' |')
    if any(r.get('compile_s') for r in rows):
        cache = {'fresh': '; inductor cache fresh at the start of the run', 'warm': '; inductor cache warm'}.get(rows[0].get('compile_cache'), '')
        lines.append(f'| compiled step: first call (compile, s{cache}) | ' + ' | '.join(f"{r['compile_s']:.1f}" if r.get('compile_s') else 'n/a' for r in rows) + ' |')
        lines.append('| compiled step: recompiles for 4 new weights | ' + ' | '.join(str(r.get('recompiles')) for r in rows) + ' |')
    only = {'fastxtend_ema (compiled)': 'bf16 models only', 'mul_+add_ (previous mixed step)': 'bf16 models only',
            'foreach_lerp_ (prebuilt lists)': 'fp32 models only'}
    why = lambda i: next((r[f'{i} (why)'] for r in rows if f'{i} (why)' in r), only.get(i, 'not run'))
    if left_out: lines.append('\nNot run: ' + '; '.join(f'{i} ({why(i)})' for i in left_out) + '.')
    return '\n'.join(lines)

def report(title, dtype, rows, impls):
    "The markdown the run prints and keeps: title, table, and what a bf16 row means"
    note = ('\n\nfastxtend_ema keeps the EMA of the bf16 model in fp32; the peers keep it in bf16 (the model\'s dtype), '
            'where an update of 1e-4 of a weight rounds away' if dtype == 'bf16' else '')
    return f'{title}\n\n{table(rows, impls)}{note}'

def plot(rows, impls, path, title):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    impls = [i for i in impls if any(r.get(i) for r in rows)]   # no empty bars for what did not run
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8/len(impls)
    for i, impl in enumerate(impls):
        ys = [(r[impl]/r['bound_us']) if r.get(impl) else 0 for r in rows]
        ax.bar([j + i*width for j in range(len(rows))], ys, width, label=impl)
    ax.axhline(1, color='k', lw=0.8, ls='--', label='one-pass bound')
    ax.set_xticks([j + width*(len(impls)-1)/2 for j in range(len(rows))], [r['model'] for r in rows])
    ax.set_ylabel('time per EMA step / bound (lower is better)'); ax.set_title(title)
    ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1))   # beside the bars, never over them
    fig.savefig(path, dpi=110, bbox_inches='tight'); plt.close(fig)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--dtype', default='fp32', choices=['fp32', 'bf16'], help='model dtype (the EMA is fp32 either way)')
    p.add_argument('--models', nargs='*', help='subset of model names')
    p.add_argument('--impls', nargs='*', help='subset of implementations')
    p.add_argument('--reps', type=int, default=None, help='timed repeats per implementation (median reported)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    p.add_argument('--quick', action='store_true', help='tiny models and 3 repeats: a smoke test, not a measurement')
    p.add_argument('--out', type=Path, default=OUT, help='folder for the JSON and the PNG')
    p.add_argument('--name', default=None, help='file name of the results, without suffix (default: ema_step_DEVICE_DTYPE)')
    p.add_argument('--warm-cache', action='store_true',
                   help="keep torch's compile cache (default, but for --quick: a fresh one, so the first compile costs what a new machine pays)")
    a = p.parse_args(argv)
    if not (a.warm_cache or a.quick):
        import atexit, os, shutil, tempfile
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = d = tempfile.mkdtemp(prefix='ema_step_inductor_')
        atexit.register(shutil.rmtree, d, ignore_errors=True)
    if a.threads: torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    models = _tiny_models() if a.quick else _all_models()
    if a.models:
        known = {**_tiny_models(), **_all_models()}
        if unknown := [m for m in a.models if m not in known]: p.error(f'--models: unknown {unknown}; known: {list(known)}')
        models = {m: known[m] for m in a.models}
    impls = a.impls or list(IMPLS)
    reps = a.reps or (3 if a.quick else 10)
    machine = (torch.cuda.get_device_name() if device.type == 'cuda'
               else f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread{"s"[:torch.get_num_threads()>1]}')
    title = f'EMA step, {a.dtype} model / fp32 EMA, {machine}, torch {torch.__version__}'
    print(f'# {title}', file=sys.stderr)
    rows = run(models, impls, device, a.dtype, reps)
    for r in rows: r['compile_cache'] = 'warm' if a.warm_cache or a.quick else 'fresh'
    text = report(title, a.dtype, rows, impls)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.name or f"ema_step_{a.device}_{a.dtype}{'_quick' if a.quick else ''}"
    (a.out/f'{stem}.json').write_text(json.dumps(dict(title=title, machine=machine, rows=rows), indent=1))
    (a.out/f'{stem}.md').write_text(f'{text}\n\nCommand: `python benchmarks/ema_step.py {shlex.join(argv or sys.argv[1:])}`\n')
    plot(rows, impls, a.out/f'{stem}.png', title)
    print(f'\nwrote {a.out/stem}.json, .md and .png', file=sys.stderr)
    return rows

if __name__ == '__main__': main()
