"""Small helpers for parameter trees: nested dicts (and lists) whose leaves are arrays.

A model's parameters are such a tree, e.g. {"wte": (V, C), "h": [{"ln_1": {"g": (C,)}, ...}]}.
Checkpoints store the flat form, one array per dotted path such as "h.0.ln_1.g".
"""


def tree_map(f, tree, *rest):
    """Apply f leaf-wise to one tree or to several trees of the same structure.

    Example: tree_map(lambda a, b: a + b, {"w": 1, "h": [2]}, {"w": 10, "h": [20]})
    -> {"w": 11, "h": [22]}.
    """
    if isinstance(tree, dict):
        return {k: tree_map(f, tree[k], *(r[k] for r in rest)) for k in tree}
    if isinstance(tree, (list, tuple)):
        return [tree_map(f, t, *(r[i] for r in rest)) for i, t in enumerate(tree)]
    return f(tree, *rest)


def tree_leaves(tree):
    """The leaves of a tree in a fixed order (dict insertion order, then list order)."""
    return list(flatten(tree).values())


def flatten(tree, prefix=""):
    """Nested tree -> {dotted path: leaf}.

    Example: {"wte": A, "h": [{"g": B}]} -> {"wte": A, "h.0.g": B}.
    """
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), t) for i, t in enumerate(tree))
    else:
        return {prefix: tree}
    flat = {}
    for key, sub in items:
        flat.update(flatten(sub, f"{prefix}.{key}" if prefix else key))
    return flat


def unflatten(flat):
    """{dotted path: leaf} -> nested tree; a level whose keys are 0..n-1 becomes a list.

    Example: {"wte": A, "h.0.g": B} -> {"wte": A, "h": [{"g": B}]}.
    """
    tree = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return _lists_from_digit_keys(tree)


def _lists_from_digit_keys(node):
    if not isinstance(node, dict):
        return node
    node = {k: _lists_from_digit_keys(v) for k, v in node.items()}
    if node and all(k.isdigit() for k in node) and sorted(map(int, node)) == list(range(len(node))):
        return [node[str(i)] for i in range(len(node))]
    return node
