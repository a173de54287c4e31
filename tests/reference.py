"""Float64 NumPy reference for the Conveyor cells: the ground truth other backends are tested against.

Written straight from /work/shared/SPEC.md, one time step at a time, with a hand-written backward through
time (no autodiff, no finite differences). Clarity over speed. Scope: one layer, one direction, no peephole,
no coupled gates, no cell clip, no dropout.

Shapes are time-major: x [T, B, I]; W [G*H, I]; R [G*H, H]; bW, bR [G*H]; h0, c0 [B, H]; y [T, B, H].
Gate blocks along the first weight axis: LSTM i, f, g, o (G=4); GRU r, z, n (G=3); RNN one block (G=1).

Every forward returns a `cache` dict holding the float64 inputs (x, W, R, activation) and, per time step,
the states and gate values the backward needs; `hs` is [T+1, B, H] with hs[0] = h0 (LSTM: `cs` likewise).
The arrays stored under names starting with `pre_` are the arguments passed to `act` (useful to check that
no relu argument sits on its kink).
"""

import numpy as np

ACTIVATIONS = ("tanh", "relu")


def _sigmoid(v):
    # 0.5 * (1 + tanh(v / 2)) equals 1 / (1 + exp(-v)) and never overflows.
    return 0.5 * (1.0 + np.tanh(0.5 * v))


def _act(pre, activation):
    if activation == "tanh":
        return np.tanh(pre)
    return np.maximum(pre, 0.0)


def _act_grad(pre, activation):
    """d act(pre) / d pre; the relu derivative at exactly 0 is 0."""
    if activation == "tanh":
        return 1.0 - np.tanh(pre) ** 2
    return (pre > 0.0).astype(np.float64)


def _as_f64(name, value, shape):
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
    return arr


def _inputs(x, W, R, bW, bR, G, activation):
    """Converts the common inputs to float64 and checks their shapes against x [T, B, I] and R [G*H, H]."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"x: expected 3 dimensions [T, B, I], got shape {x.shape}")
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != G * R.shape[1]:
        raise ValueError(f"R: expected shape [{G}*H, H], got {R.shape}")
    H = R.shape[1]
    W = _as_f64("W", W, (G * H, x.shape[2]))
    bW = _as_f64("bW", bW, (G * H,))
    bR = _as_f64("bR", bR, (G * H,))
    return x, W, R, bW, bR


def _weight_grads(cache, da_in, da_rec, x_rec):
    """Turns the per-step pre-activation gradients into (dx, dW, dR, dbW, dbR).

    da_in [T, B, G*H] multiplies W x_t + bW; da_rec [T, B, G*H] multiplies R x_rec_t + bR, where x_rec is
    [T, B, G, H]: the recurrent input seen by each gate block (h_{t-1}, or r * h_{t-1} for the GRU n block
    when reset_after=False).
    """
    W, R = cache["W"], cache["R"]
    H = R.shape[1]
    G = R.shape[0] // H
    dx = np.zeros_like(cache["x"])
    dW = np.zeros_like(W)
    dR = np.zeros_like(R)
    for t in range(cache["x"].shape[0]):
        dx[t] = da_in[t] @ W
        dW += da_in[t].T @ cache["x"][t]
        for k in range(G):
            block = slice(k * H, (k + 1) * H)
            dR[block] += da_rec[t][:, block].T @ x_rec[t][:, k]
    return dx, dW, dR, da_in.sum(axis=(0, 1)), da_rec.sum(axis=(0, 1))


# ----------------------------------------------------------------------------------------------------- LSTM


def lstm_forward(x, W, R, bW, bR, h0, c0, activation="tanh"):
    """LSTM window, gates i, f, g, o. Returns (y [T, B, H], h_T, c_T, cache)."""
    x, W, R, bW, bR = _inputs(x, W, R, bW, bR, 4, activation)
    T, B, _ = x.shape
    H = R.shape[1]
    h0 = _as_f64("h0", h0, (B, H))
    c0 = _as_f64("c0", c0, (B, H))

    hs = np.zeros((T + 1, B, H))
    cs = np.zeros((T + 1, B, H))
    hs[0], cs[0] = h0, c0
    gates = {name: np.zeros((T, B, H)) for name in ("i", "f", "g", "o", "pre_g")}
    for t in range(T):
        h_prev, c_prev = hs[t], cs[t]
        a = x[t] @ W.T + bW + h_prev @ R.T + bR
        a_i, a_f, a_g, a_o = (a[:, k * H:(k + 1) * H] for k in range(4))
        i = _sigmoid(a_i)
        f = _sigmoid(a_f)
        g = _act(a_g, activation)
        c = f * c_prev + i * g
        o = _sigmoid(a_o)
        h = o * _act(c, activation)
        hs[t + 1], cs[t + 1] = h, c
        for name, value in (("i", i), ("f", f), ("g", g), ("o", o), ("pre_g", a_g)):
            gates[name][t] = value

    cache = {"x": x, "W": W, "R": R, "activation": activation, "hs": hs, "cs": cs, **gates}
    return hs[1:].copy(), hs[T].copy(), cs[T].copy(), cache


def lstm_backward(cache, dy, dh_T, dc_T):
    """Backward through the window. Returns (dx, dh0, dc0, dW, dR, dbW, dbR)."""
    hs, cs, activation = cache["hs"], cache["cs"], cache["activation"]
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    dy = _as_f64("dy", dy, (T, B, H))
    dh_next = _as_f64("dh_T", dh_T, (B, H)).copy()
    dc_next = _as_f64("dc_T", dc_T, (B, H)).copy()

    da = np.zeros((T, B, 4 * H))
    for t in reversed(range(T)):
        i, f, g, o = cache["i"][t], cache["f"][t], cache["g"][t], cache["o"][t]
        c_prev, c = cs[t], cs[t + 1]
        dh = dy[t] + dh_next
        # h_t = o * act(c_t)
        do = dh * _act(c, activation)
        dc = dc_next + dh * o * _act_grad(c, activation)
        # c_t = f * c_{t-1} + i * g
        df = dc * c_prev
        di = dc * g
        dg = dc * i
        dc_next = dc * f
        # gate nonlinearities
        da_i = di * i * (1.0 - i)
        da_f = df * f * (1.0 - f)
        da_g = dg * _act_grad(cache["pre_g"][t], activation)
        da_o = do * o * (1.0 - o)
        da[t] = np.concatenate([da_i, da_f, da_g, da_o], axis=1)
        # a = W x_t + bW + R h_{t-1} + bR
        dh_next = da[t] @ cache["R"]

    x_rec = np.repeat(hs[:-1, :, None, :], 4, axis=2)
    dx, dW, dR, dbW, dbR = _weight_grads(cache, da, da, x_rec)
    return dx, dh_next, dc_next, dW, dR, dbW, dbR


# ------------------------------------------------------------------------------------------------------ GRU


def gru_forward(x, W, R, bW, bR, h0, reset_after=True, activation="tanh"):
    """GRU window, gates r, z, n (z near 1 keeps the old state). Returns (y [T, B, H], h_T, cache)."""
    x, W, R, bW, bR = _inputs(x, W, R, bW, bR, 3, activation)
    T, B, _ = x.shape
    H = R.shape[1]
    h0 = _as_f64("h0", h0, (B, H))
    W_r, W_z, W_n = W[:H], W[H:2 * H], W[2 * H:]
    R_r, R_z, R_n = R[:H], R[H:2 * H], R[2 * H:]
    bW_r, bW_z, bW_n = bW[:H], bW[H:2 * H], bW[2 * H:]
    bR_r, bR_z, bR_n = bR[:H], bR[H:2 * H], bR[2 * H:]

    hs = np.zeros((T + 1, B, H))
    hs[0] = h0
    gates = {name: np.zeros((T, B, H)) for name in ("r", "z", "n", "pre_n", "rec_n")}
    for t in range(T):
        h_prev = hs[t]
        r = _sigmoid(x[t] @ W_r.T + bW_r + h_prev @ R_r.T + bR_r)
        z = _sigmoid(x[t] @ W_z.T + bW_z + h_prev @ R_z.T + bR_z)
        if reset_after:
            rec_n = h_prev @ R_n.T + bR_n  # R_n h_{t-1} + bR_n, gated by r afterwards
            a_n = x[t] @ W_n.T + bW_n + r * rec_n
        else:
            rec_n = r * h_prev  # the recurrent input of the n block: r * h_{t-1}
            a_n = x[t] @ W_n.T + bW_n + rec_n @ R_n.T + bR_n
        n = _act(a_n, activation)
        h = (1.0 - z) * n + z * h_prev
        hs[t + 1] = h
        for name, value in (("r", r), ("z", z), ("n", n), ("pre_n", a_n), ("rec_n", rec_n)):
            gates[name][t] = value

    cache = {"x": x, "W": W, "R": R, "activation": activation, "reset_after": reset_after, "hs": hs, **gates}
    return hs[1:].copy(), hs[T].copy(), cache


def gru_backward(cache, dy, dh_T):
    """Backward through the window. Returns (dx, dh0, dW, dR, dbW, dbR)."""
    hs, activation, reset_after = cache["hs"], cache["activation"], cache["reset_after"]
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    R = cache["R"]
    R_r, R_z, R_n = R[:H], R[H:2 * H], R[2 * H:]
    dy = _as_f64("dy", dy, (T, B, H))
    dh_next = _as_f64("dh_T", dh_T, (B, H)).copy()

    da_in = np.zeros((T, B, 3 * H))
    da_rec = np.zeros((T, B, 3 * H))
    for t in reversed(range(T)):
        r, z, n, rec_n = cache["r"][t], cache["z"][t], cache["n"][t], cache["rec_n"][t]
        h_prev = hs[t]
        dh = dy[t] + dh_next
        # h_t = (1 - z) * n + z * h_{t-1}
        dn = dh * (1.0 - z)
        dz = dh * (h_prev - n)
        dh_prev = dh * z
        da_n = dn * _act_grad(cache["pre_n"][t], activation)
        da_z = dz * z * (1.0 - z)
        if reset_after:
            # a_n = W_n x_t + bW_n + r * (R_n h_{t-1} + bR_n)
            dr = da_n * rec_n
            da_rec_n = da_n * r
            dh_prev += da_rec_n @ R_n
        else:
            # a_n = W_n x_t + bW_n + R_n (r * h_{t-1}) + bR_n
            drh = da_n @ R_n
            dr = drh * h_prev
            da_rec_n = da_n
            dh_prev += drh * r
        da_r = dr * r * (1.0 - r)
        dh_prev += da_r @ R_r + da_z @ R_z
        da_in[t] = np.concatenate([da_r, da_z, da_n], axis=1)
        da_rec[t] = np.concatenate([da_r, da_z, da_rec_n], axis=1)
        dh_next = dh_prev

    x_rec = np.stack([hs[:-1], hs[:-1], hs[:-1] if reset_after else cache["rec_n"]], axis=2)
    dx, dW, dR, dbW, dbR = _weight_grads(cache, da_in, da_rec, x_rec)
    return dx, dh_next, dW, dR, dbW, dbR


# ------------------------------------------------------------------------------------------------------ RNN


def rnn_forward(x, W, R, bW, bR, h0, activation="tanh"):
    """Elman RNN window, h_t = act(W x_t + bW + R h_{t-1} + bR). Returns (y [T, B, H], h_T, cache)."""
    x, W, R, bW, bR = _inputs(x, W, R, bW, bR, 1, activation)
    T, B, _ = x.shape
    H = R.shape[1]
    h0 = _as_f64("h0", h0, (B, H))

    hs = np.zeros((T + 1, B, H))
    hs[0] = h0
    pre = np.zeros((T, B, H))
    for t in range(T):
        pre[t] = x[t] @ W.T + bW + hs[t] @ R.T + bR
        hs[t + 1] = _act(pre[t], activation)

    cache = {"x": x, "W": W, "R": R, "activation": activation, "hs": hs, "pre_h": pre}
    return hs[1:].copy(), hs[T].copy(), cache


def rnn_backward(cache, dy, dh_T):
    """Backward through the window. Returns (dx, dh0, dW, dR, dbW, dbR)."""
    hs, activation = cache["hs"], cache["activation"]
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    dy = _as_f64("dy", dy, (T, B, H))
    dh_next = _as_f64("dh_T", dh_T, (B, H)).copy()

    da = np.zeros((T, B, H))
    for t in reversed(range(T)):
        dh = dy[t] + dh_next
        da[t] = dh * _act_grad(cache["pre_h"][t], activation)
        dh_next = da[t] @ cache["R"]

    dx, dW, dR, dbW, dbR = _weight_grads(cache, da, da, hs[:-1, :, None, :])
    return dx, dh_next, dW, dR, dbW, dbR
