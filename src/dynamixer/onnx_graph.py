"""Rewrites of the exported ONNX graph that keep its function and make ONNX Runtime faster.

`softmax_on_last_axis`: the plain path normalises the mixing logits over the *input* tokens,
``softmax(dim=-2)`` of a (..., S, N_in, N_out) tensor, and then mixes with the transposed matrix.
ONNX Runtime computes a softmax over any axis but the last by transposing the tensor there and
back, which made Softmax the costliest operator after the matmuls in the int8 file. Permuting the
generator's output columns (a constant) makes it emit the logits as (..., S, N_out, N_in), so the
softmax runs over the last axis and the transpose before the mixing matmul goes away: the same
numbers, two transposes fewer per mixing op.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

__all__ = ['softmax_on_last_axis']


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def softmax_on_last_axis(model: Any) -> int:
    """Rewrite, in place, every mixing softmax of `model` (an onnx ModelProto from
    `export.export_onnx`) whose pattern is exactly

        MatMul(r, W) -> Add(b) -> Reshape(..., n, n) -> Softmax(axis=-2) -> Transpose(last two axes)

    with W, b and the shape constants (initializers): W's and b's columns are permuted from
    [in i, out j] to [out j, in i], the softmax takes the last axis and the Transpose is removed.
    Anything else is left as it is. Returns the number of softmaxes rewritten.
    """
    from onnx import numpy_helper
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: Dict[str, List[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in graph.output}

    def const(name: str) -> Optional[np.ndarray]:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def only_consumer(name: str) -> Optional[Any]:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in graph_outputs else None

    removed, replaced, done = [], set(), 0
    for softmax in [n for n in graph.node if n.op_type == 'Softmax']:
        reshape = producer.get(softmax.input[0])
        transpose = only_consumer(softmax.output[0])
        if reshape is None or reshape.op_type != 'Reshape' or transpose is None or transpose.op_type != 'Transpose':
            continue
        shape = const(reshape.input[1])
        if shape is None or shape.ndim != 1 or len(shape) < 2 or shape[-1] != shape[-2] or shape[-1] <= 0:
            continue
        rank, n = len(shape), int(shape[-1])
        if _attr(softmax, 'axis', -1) not in (-2, rank - 2):
            continue
        if list(_attr(transpose, 'perm', [])) != list(range(rank - 2)) + [rank - 1, rank - 2]:
            continue
        add = producer.get(reshape.input[0])
        if add is None or add.op_type != 'Add' or only_consumer(add.output[0]) is not reshape:
            continue
        matmul_in = [i for i in add.input if i in producer and producer[i].op_type == 'MatMul']
        bias_in = [i for i in add.input if i in inits]
        if len(matmul_in) != 1 or len(bias_in) != 1:
            continue
        matmul = producer[matmul_in[0]]
        if only_consumer(matmul.output[0]) is not add or matmul.input[1] not in inits:
            continue
        weight, bias = const(matmul.input[1]), const(bias_in[0])
        if weight is None or bias is None or weight.ndim != 2 or weight.shape[1] != n * n or bias.shape != (n * n,):
            continue
        # new column j*n + i takes old column i*n + j
        perm = np.arange(n * n).reshape(n, n).T.reshape(-1)
        pairs: List[Tuple[Any, str, np.ndarray]] = [(matmul, matmul.input[1], weight[:, perm]),
                                                    (add, bias_in[0], bias[perm])]
        for node, old, value in pairs:
            new_name = f'{old}_out_major_{done}'  # new initializers: the exporter shares equal ones
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), new_name))
            node.input[list(node.input).index(old)] = new_name
            replaced.add(old)
        for a in softmax.attribute:
            if a.name == 'axis':
                a.i = -1
        for user in consumers.get(transpose.output[0], []):
            for k, name in enumerate(user.input):
                if name == transpose.output[0]:
                    user.input[k] = softmax.output[0]
        removed.append(transpose)
        done += 1
    for node in removed:
        graph.node.remove(node)
    # the original W and b, unless something else still reads them (the exporter shares equal ones)
    used = {i for node in graph.node for i in node.input} | {i.name for i in graph.input}
    for t in [t for t in graph.initializer if t.name in replaced and t.name not in used]:
        graph.initializer.remove(t)
    return done
