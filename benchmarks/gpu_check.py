"""Everything about the EMA that needs a CUDA GPU, in one command (under 5 minutes on one GPU).

On a CUDA machine it runs, and reports:

1. the CUDA tests (`tests/test_cuda.py`: the exact, allocation-free mixed step; no host-device synchronisation in the
   callback's per-batch work; fastai `MixedPrecision` fp16/bf16 against the float64 reference, overflow steps skipped;
   `ema_device='cpu'`; a compiled model, CUDA graphs included, validated on the EMA) and every `#|cuda` notebook cell;
2. the EMA step on the GPU for fp32 and bf16 models (ResNet-50, GPT-2-medium), against the one-pass bound (one fp32
   `lerp_` over as many elements) and the copy bandwidth (one fp32 `copy_`), with the peers beside it; the share of
   copy bandwidth each step reaches, counting the bytes it must move (12 per element for fp32, 10 for bf16/fp32);
3. the cost per step of an EMA in host memory (`ema_device='cpu'`): the pinned, non-blocking, deferred copy against a
   blocking one, with the GPU busy between steps as in training.

Without CUDA it says so, runs its CPU part (a quick bf16 step benchmark, which exercises this script's machinery), and
exits 0. Results go to `benchmarks/out/gpu_check.json`.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --skip-tests    # the measurements only
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT/'benchmarks'/'out'
sys.path.insert(0, str(ROOT/'benchmarks'))
import torch

def run_pytest(args:list, env:dict|None=None, timeout:int=240) -> dict:
    "Run pytest on `args`; its exit code and last summary line"
    t = time.perf_counter()
    p = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, **(env or {})})
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    return dict(args=args, rc=p.returncode, summary=lines[-1] if lines else '', seconds=round(time.perf_counter()-t, 1),
                failures=[l for l in lines if l.startswith(('FAILED', 'ERROR'))])

def step_benchmark(device:str, dtype:str, models:list, reps:int) -> list:
    "`benchmarks/ema_step.py`'s measurement, with the share of copy bandwidth reached"
    import ema_step
    zoo = {**ema_step._tiny_models(), **ema_step._all_models()}
    impls = ['fastxtend_ema', 'fastxtend_ema (compiled)', 'mul_+add_ (previous mixed step)', 'foreach_lerp_ (prebuilt lists)',
             'torch AveragedModel', 'ema-pytorch', 'timm ModelEmaV3', 'fastxtend 0.1.7 (foreach)']
    rows = ema_step.run({k: zoo[k] for k in models}, impls, torch.device(device), dtype, reps)
    for r in rows:
        n = r['params_m']*1e6
        moved = 12 if dtype == 'fp32' else 10   # bytes per element the step must move: read model, read and write EMA
        copy_bw = 8*n/(r['copy_us']*1e-6)
        r['copy_GBps'] = round(copy_bw/1e9, 1)
        r['share_of_copy_bandwidth'] = {i: round(moved*n/(r[i]*1e-6)/copy_bw, 3) for i in ('fastxtend_ema', 'fastxtend_ema (compiled)') if r.get(i)}
    print(ema_step.table(rows, impls))
    return rows

def host_memory_ema(reps:int=30) -> dict:
    "Per-step cost of an EMA in host memory for a CUDA model: deferred non-blocking copy against a blocking one"
    from fastxtend_ema.update import RemoteLerp
    torch.manual_seed(0)
    params = [torch.randn(4096, 4096, device='cuda', dtype=torch.bfloat16) for _ in range(6)]   # 100M elements
    work = torch.randn(4096, 4096, device='cuda')
    def busy():   # the GPU's forward and backward between two EMA steps
        for _ in range(20): work.mul_(0.999).add_(1e-3)
    res = {}
    for name,defer in (('none', None), ('deferred, pinned, non-blocking', True), ('blocking copy', False)):
        ema = [torch.zeros(p.shape) for p in params]
        r = RemoteLerp(ema, params, defer=defer) if defer is not None else None
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            busy()
            if r is not None: r(0.01)
        if r is not None: r.flush()
        torch.cuda.synchronize()
        res[name] = (time.perf_counter() - t)/reps*1e3
    res = {k: round(v, 2) for k,v in res.items()}
    res['extra per step, deferred (ms)'] = round(res['deferred, pinned, non-blocking'] - res['none'], 2)
    res['extra per step, blocking (ms)'] = round(res['blocking copy'] - res['none'], 2)
    return res

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--skip-tests', action='store_true', help='the measurements only')
    p.add_argument('--reps', type=int, default=20, help='timed repeats per implementation')
    p.add_argument('--out', type=Path, default=OUT)
    a = p.parse_args(argv)
    report = dict(torch=torch.__version__)
    if not torch.cuda.is_available():
        print('no CUDA device: the GPU checks did not run. The CPU part: a quick bf16 EMA step benchmark.')
        report.update(cuda=False, cpu_step=step_benchmark('cpu', 'bf16', ['MLP-100k'], reps=3))
    else:
        report.update(cuda=True, device=torch.cuda.get_device_name())
        print(f'# {report["device"]}, torch {torch.__version__}')
        if not a.skip_tests:
            report['cuda_tests'] = run_pytest(['tests/test_cuda.py'])
            report['cuda_notebook_cells'] = run_pytest(['tests/test_notebooks.py'], env={'FASTXTEND_EMA_TEST_FLAGS': 'cuda'})
            for k in ('cuda_tests', 'cuda_notebook_cells'): print(f"{k}: {report[k]['summary']} ({report[k]['seconds']} s)")
        for dtype in ('fp32', 'bf16'):
            print(f'\n## EMA step, {dtype} model, fp32 EMA')
            report[f'step_{dtype}'] = step_benchmark('cuda', dtype, ['ResNet-50', 'GPT-2-medium'], a.reps)
        print('\n## EMA in host memory (ms per step, GPU busy between steps)')
        report['host_memory_ema'] = host_memory_ema()
        print(json.dumps(report['host_memory_ema'], indent=1))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out/'gpu_check.json').write_text(json.dumps(report, indent=1, default=str))
    failed = [k for k in ('cuda_tests', 'cuda_notebook_cells') if report.get(k, {}).get('rc', 0) not in (0, 5)]
    if failed: print(f'FAILED: {failed}'); return 1
    return 0

if __name__ == '__main__': sys.exit(main())
