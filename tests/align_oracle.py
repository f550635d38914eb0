"""Plain-Python oracle for gapfix.align: the full DP matrix and an explicit
traceback, written straight from docs/design.md ("The alignment") with no cleverness. O(n*m) per pair:
use it on short rows only."""

EOS = object()  # y_m: a virtual EOS distinct from every id


def dp_matrix(g, y):
    n, m = len(g), len(y)
    D = [[0] * (m + 1) for _ in range(n + 1)]
    for j in range(m + 1):
        D[0][j] = j
    for t in range(1, n + 1):
        D[t][0] = t
        for j in range(1, m + 1):
            D[t][j] = min(
                D[t - 1][j - 1] + (g[t - 1] != y[j - 1]),
                D[t - 1][j] + 1,
                D[t][j - 1] + 1,
            )
    return D


def align_pair(g, y, max_targets=0):
    """Returns dict(distance, path, cost, first, last, targets) for one pair (rows 0..n)."""
    g, y = list(g), list(y)
    n, m = len(g), len(y)
    D = dp_matrix(g, y)
    # Canonical traceback: diagonal, else up, else left; j(t) = smallest j in row t.
    path = [None] * (n + 1)
    t, j = n, m
    while t > 0:
        if j > 0 and D[t][j] == D[t - 1][j - 1] + (g[t - 1] != y[j - 1]):
            path[t] = j
            t, j = t - 1, j - 1
        elif D[t][j] == D[t - 1][j] + 1:
            path[t] = j
            t -= 1
        else:
            assert j > 0 and D[t][j] == D[t][j - 1] + 1
            j -= 1
    path[0] = 0
    cost, first, last, targets = [], [], [], []
    tokens = y + [EOS]
    for t in range(n + 1):
        c = min(D[t])
        J = [j for j in range(m + 1) if D[t][j] == c]
        cost.append(c)
        first.append(J[0])
        last.append(J[-1])
        seen, row = [], []
        for j in J:
            if len(row) == max_targets:
                break
            if not any(tokens[j] is s or tokens[j] == s for s in seen):
                seen.append(tokens[j])
                row.append(j)
        targets.append(row + [-1] * (max_targets - len(row)))
    return dict(distance=D[n][m], path=path, cost=cost, first=first, last=last, targets=targets)
