"""ONNX Runtime's int8 matmul against its float32 matmul, one MatMul at a time, at dynamixer_s's shapes.

A whole int8 model can only be as much faster than float32 as its matmuls are (the rest of the
graph stays float in both files). This builds one-node ONNX models (float32 MatMul with a constant
weight), quantises each with ``quantize_dynamic`` as `dynamixer export --quantize int8` does
(int8 weights per output channel, activations quantised per call: DynamicQuantizeMatMul after
ONNX Runtime's fusion), and times both in interleaved rounds with 1 and 2 intra-op threads.

    python benchmarks/int8_gemm.py --rounds 15

Shapes (rows M = tokens of a batch of 16 at 224x224): stage 1 (32x32 tokens, C = 192) MLP
fc1 / fc2, stages 2-4 (16x16 tokens, C = 384) MLP fc1 / fc2 and a C x C projection.
"""
import argparse
import os
import tempfile
from typing import List, Optional

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from dynamixer.inference import ort_session
from dynamixer.measure import interleaved_rounds, load_average, median

SHAPES = {  # name -> (M, K, N)
    'stage 1 fc1': (16384, 192, 576),
    'stage 1 fc2': (16384, 576, 192),
    'stage 2-4 fc1': (4096, 384, 1152),
    'stage 2-4 fc2': (4096, 1152, 384),
    'stage 2-4 proj': (4096, 384, 384),
}


def build(m: int, k: int, n: int, path: str) -> str:
    """One MatMul node with a constant weight, and its dynamic int8 version; returns the int8 path."""
    weight = numpy_helper.from_array((np.random.default_rng(0).standard_normal((k, n)) * 0.05).astype(np.float32), 'W')
    graph = helper.make_graph([helper.make_node('MatMul', ['x', 'W'], ['y'])], 'matmul',
                              [helper.make_tensor_value_info('x', TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, [m, n])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 20)]), path)
    quantize_dynamic(path, path + '.int8.onnx', per_channel=True, weight_type=QuantType.QInt8)
    return path + '.int8.onnx'


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--rounds', type=int, default=15)
    p.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    p.add_argument('--scale', type=int, default=1, help='divide M (the rows) by this (a quick check)')
    args = p.parse_args(argv)
    print(f'onnxruntime {ort.__version__}; load average {load_average()}; '
          f'medians of {args.rounds} interleaved calls\n')
    print('| matmul | M x K x N | threads | float32 ms | int8 ms | int8 speed-up |')
    print('|---|---|---|---|---|---|')
    with tempfile.TemporaryDirectory() as tmp:
        for name, (m, k, n) in SHAPES.items():
            m //= args.scale
            float_path = os.path.join(tmp, f'{m}_{k}_{n}.onnx')
            int8_path = build(m, k, n, float_path)
            x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
            for threads in args.threads:
                # spin=False: a single-node run is short, and a pool still spinning after its run
                # takes a core from the other session's next run (measured: two-thread float32
                # times no faster than one-thread with spinning on)
                sessions = {key: ort_session(path, threads, spin=False)
                            for key, path in (('float32', float_path), ('int8', int8_path))}
                calls = {key: (lambda s=s, x=x: s.run(None, {'x': x})) for key, s in sessions.items()}
                times = interleaved_rounds(calls, args.rounds, warmup=1)
                f, q = (median(times[key]) * 1e3 for key in ('float32', 'int8'))
                print(f'| {name} | {m} x {k} x {n} | {threads} | {f:.1f} | {q:.1f} | {f / q:.2f}x |')

    return 0


if __name__ == '__main__':
    raise SystemExit(main())
