"""Float64 NumPy reference for the Conveyor cells: the ground truth other backends are tested against.

Written straight from docs/math.md, one time step at a time, with a hand-written backward through
time (no autodiff, no finite differences). Clarity over speed. Scope: one layer, one direction; the LSTM
with optional peephole, coupled gates (CIFG), forget bias, cell clip and projection; for every cell an
optional constant mask on h_{t-1} inside the recurrent product (recurrent dropout) and on R (DropConnect,
`weight_mask`); the LSTM and the GRU with layer normalisation (gains `gamma_x`, `gamma_h`, and for the LSTM
`gamma_c`, `beta_c`) and zoneout (the keep factors `zoneout` of h and `zoneout_cell` of c, per step, row and
unit: 0 or 1 in training, z in evaluation); no dropout between layers.

Shapes are time-major: x [T, B, I]; W [G*H, I]; R [G*H, H]; bW, bR [G*H]; h0, c0 [B, H]; y [T, B, H];
recurrent_mask [T, B, H]; LSTM peephole [3, H] (rows p_i, p_f, p_o).
Gate blocks along the first weight axis: LSTM i, f, g, o (G=4), coupled-gate LSTM f, g, o (G=3);
GRU r, z, n (G=3); RNN one block (G=1).

Every forward returns a `cache` dict holding the float64 inputs (x, W, R, activation, options) and, per time
step, the states and gate values the backward needs; `hs` is [T+1, B, H] with hs[0] = h0 (LSTM: `cs`
likewise, after the clip), and `hms` [T, B, H] is the recurrent input m_t * h_{t-1} (h_{t-1} when there is no
mask). The arrays stored under names starting with `pre_` are the arguments passed to `act` (useful to check
that no relu argument sits on its kink).
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


def _inputs(x, W, R, bW, bR, G, activation, hidden=None):
    """Converts the common inputs to float64 and checks their shapes against x [T, B, I] and R [G*H, H]
    (with a projection of `hidden` units to P: R [G*hidden, P])."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"x: expected 3 dimensions [T, B, I], got shape {x.shape}")
    R = np.asarray(R, dtype=np.float64)
    H = R.shape[1] if hidden is None else hidden
    if R.ndim != 2 or R.shape[0] != G * H:
        raise ValueError(f"R: expected shape [{G}*H, {'H' if hidden is None else 'P'}], got {R.shape}")
    W = _as_f64("W", W, (G * H, x.shape[2]))
    bW = _as_f64("bW", bW, (G * H,))
    bR = _as_f64("bR", bR, (G * H,))
    return x, W, R, bW, bR


def _recurrent_mask(mask, shape):
    """None, or the [T, B, H] mask as float64."""
    return None if mask is None else _as_f64("recurrent_mask", mask, shape)


def _masked(v, mask):
    """mask * v, or v itself when there is no mask (so the unmasked path stays bit-for-bit unchanged)."""
    return v if mask is None else mask * v


_LN_EPS = 1e-5


def _layer_norm(v, gamma, beta=None):
    """LN(v; gamma, beta) over the last axis (biased variance), and what its backward needs."""
    mean = v.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((v - mean) ** 2).mean(axis=-1, keepdims=True) + _LN_EPS)
    v_hat = (v - mean) * rstd
    return gamma * v_hat + (0.0 if beta is None else beta), (v_hat, rstd)


def _layer_norm_backward(d_out, gamma, saved):
    """(dv, dgamma, dbeta) of out = gamma * v_hat + beta, v_hat the row-normalised v; dgamma and dbeta summed
    over the rows."""
    v_hat, rstd = saved
    d_hat = d_out * gamma
    dv = rstd * (d_hat - d_hat.mean(axis=-1, keepdims=True)
                 - v_hat * (d_hat * v_hat).mean(axis=-1, keepdims=True))
    return dv, (d_out * v_hat).sum(axis=0), d_out.sum(axis=0)


def _layer_norm_gains(G, H, gamma_x, gamma_h, gamma_c=None, beta_c=None, lstm=True):
    """None without layer normalisation, else the gains as float64 (all of them given, or none)."""
    given = [gamma_x, gamma_h] + ([gamma_c, beta_c] if lstm else [])
    if all(g is None for g in given):
        return None
    if any(g is None for g in given):
        raise ValueError("layer norm: give every gain (gamma_x, gamma_h; the LSTM's gamma_c, beta_c too) or "
                         "none")
    gains = {"gamma_x": _as_f64("gamma_x", gamma_x, (G * H,)),
             "gamma_h": _as_f64("gamma_h", gamma_h, (G * H,))}
    if lstm:
        gains.update(gamma_c=_as_f64("gamma_c", gamma_c, (H,)), beta_c=_as_f64("beta_c", beta_c, (H,)))
    return gains


def _zoneout(previous, new, keep):
    """keep * previous + (1 - keep) * new, or new without zoneout."""
    return new if keep is None else keep * previous + (1.0 - keep) * new


def _weight_grads(cache, da_in, da_rec, x_rec, bias_grads=None):
    """Turns the per-step pre-activation gradients into (dx, dW, dR, dbW, dbR).

    da_in [T, B, G*H] multiplies W x_t + bW; da_rec [T, B, G*H] multiplies R x_rec_t + bR, where x_rec is
    [T, B, G, P]: the recurrent input seen by each gate block (h_{t-1}, or r * h_{t-1} for the GRU n block
    when reset_after=False; P = H but for a projected LSTM's). With layer normalisation da_in and da_rec are
    the gradients of the products before it and `bias_grads` (dbW, dbR) those of the biases after it. With a
    weight mask M (DropConnect) the product used R * M, and dR is M times the gradient of that.
    """
    W, R = cache["W"], cache["R"]
    G = x_rec.shape[2]
    H = R.shape[0] // G
    dx = np.zeros_like(cache["x"])
    dW = np.zeros_like(W)
    dR = np.zeros_like(R)
    for t in range(cache["x"].shape[0]):
        dx[t] = da_in[t] @ W
        dW += da_in[t].T @ cache["x"][t]
        for k in range(G):
            block = slice(k * H, (k + 1) * H)
            dR[block] += da_rec[t][:, block].T @ x_rec[t][:, k]
    if cache.get("weight_mask") is not None:
        dR = dR * cache["weight_mask"]
    if bias_grads is not None:
        return dx, dW, dR, *bias_grads
    return dx, dW, dR, da_in.sum(axis=(0, 1)), da_rec.sum(axis=(0, 1))


# ----------------------------------------------------------------------------------------------------- LSTM


def lstm_forward(x, W, R, bW, bR, h0, c0, activation="tanh", *, peephole=None, coupled_gates=False,
                 forget_bias=0.0, cell_clip=None, recurrent_mask=None, projection=None, gamma_x=None,
                 gamma_h=None, gamma_c=None, beta_c=None, zoneout=None, zoneout_cell=None, weight_mask=None):
    """LSTM window, gates i, f, g, o (coupled_gates: f, g, o and i = 1 - f). Returns (y, h_T, c_T, cache).

    peephole: None or [3, H] (p_i, p_f, p_o; p_i unused with coupled_gates). forget_bias: added to f's
    pre-activation. cell_clip: None or > 0, clamps c_t to [-cell_clip, cell_clip]. recurrent_mask: None or
    [T, B, P], multiplies h_{t-1} inside R h_{t-1}. projection: None or W_hr [P, H] (LSTMP, Sak et al. 2014;
    PyTorch's proj_size): h_t = W_hr (o * act(c_t)), so h0, y, h_T and R's columns have P units, c has H.
    gamma_x, gamma_h [G*H], gamma_c, beta_c [H]: layer normalisation (Ba et al. 2016), a = LN(W x_t; gamma_x)
    + bW + LN(R h; gamma_h) + bR and h = o * act(LN(c_t; gamma_c, beta_c)); peepholes and c_T see the raw c.
    zoneout [T, B, P], zoneout_cell [T, B, H]: the keep factors d of h_t = d h_{t-1} + (1 - d) h~_t (and of
    c).
    weight_mask: None or [G*H, P], multiplies R elementwise (DropConnect; already scaled by 1 / (1 - p)).
    """
    G = 3 if coupled_gates else 4
    hidden = None if projection is None else np.asarray(projection).shape[1]
    x, W, R, bW, bR = _inputs(x, W, R, bW, bR, G, activation, hidden)
    T, B, _ = x.shape
    H = R.shape[0] // G
    P = R.shape[1]  # the state's units: H without a projection
    if projection is not None:
        projection = _as_f64("projection", projection, (P, H))
    h0 = _as_f64("h0", h0, (B, P))
    c0 = _as_f64("c0", c0, (B, H))
    if peephole is not None:
        peephole = _as_f64("peephole", peephole, (3, H))
    forget_bias = float(forget_bias)
    if not np.isfinite(forget_bias):
        raise ValueError(f"forget_bias: expected a finite number, got {forget_bias!r}")
    if cell_clip is not None:
        cell_clip = float(cell_clip)
        if not (np.isfinite(cell_clip) and cell_clip > 0.0):
            raise ValueError(f"cell_clip: expected None or a finite number > 0, got {cell_clip!r}")
    mask = _recurrent_mask(recurrent_mask, (T, B, P))
    ln = _layer_norm_gains(G, H, gamma_x, gamma_h, gamma_c, beta_c)
    keep_h = None if zoneout is None else _as_f64("zoneout", zoneout, (T, B, P))
    keep_c = None if zoneout_cell is None else _as_f64("zoneout_cell", zoneout_cell, (T, B, H))
    weight_mask = None if weight_mask is None else _as_f64("weight_mask", weight_mask, R.shape)
    R_used = R if weight_mask is None else R * weight_mask

    hs = np.zeros((T + 1, B, P))
    cs = np.zeros((T + 1, B, H))
    hs[0], cs[0] = h0, c0
    hms = np.zeros((T, B, P))
    ms = np.zeros((T, B, H))  # o * act(c_t), before the projection
    names = ("i", "f", "g", "o", "pre_g", "pre_c", "c_cell", "c_unclipped", "clip_pass")
    gates = {name: np.zeros((T, B, H)) for name in names}
    norms = []  # per step, what the layer norms' backward needs: (x part, recurrent part, cell)
    for t in range(T):
        h_prev, c_prev = hs[t], cs[t]
        hm = _masked(h_prev, None if mask is None else mask[t])
        ax, ar = x[t] @ W.T, hm @ R_used.T
        saved = [None, None, None]
        if ln is not None:
            ax, saved[0] = _layer_norm(ax, ln["gamma_x"])
            ar, saved[1] = _layer_norm(ar, ln["gamma_h"])
        a = ax + bW + ar + bR
        blocks = [a[:, k * H:(k + 1) * H] for k in range(G)]
        if coupled_gates:
            a_f, a_g, a_o = blocks
        else:
            a_i, a_f, a_g, a_o = blocks
        pre_f = a_f + forget_bias
        if peephole is not None:
            pre_f = pre_f + peephole[1] * c_prev
        f = _sigmoid(pre_f)
        if coupled_gates:
            i = 1.0 - f
        else:
            pre_i = a_i if peephole is None else a_i + peephole[0] * c_prev
            i = _sigmoid(pre_i)
        g = _act(a_g, activation)
        c_unclipped = f * c_prev + i * g
        if cell_clip is None:
            c = c_unclipped
            clip_pass = np.ones((B, H))
        else:
            c = np.clip(c_unclipped, -cell_clip, cell_clip)
            # d c / d c_unclipped: 1 strictly inside the bounds, 0 where clipped (on a bound: clipped)
            clip_pass = (np.abs(c_unclipped) < cell_clip).astype(np.float64)
        pre_o = a_o if peephole is None else a_o + peephole[2] * c
        o = _sigmoid(pre_o)
        pre_c = c
        if ln is not None:
            pre_c, saved[2] = _layer_norm(c, ln["gamma_c"], ln["beta_c"])
        m = o * _act(pre_c, activation)
        h = m if projection is None else m @ projection.T
        hs[t + 1] = _zoneout(h_prev, h, None if keep_h is None else keep_h[t])
        cs[t + 1] = _zoneout(c_prev, c, None if keep_c is None else keep_c[t])
        hms[t], ms[t] = hm, m
        norms.append(saved)
        for name, value in zip(names, (i, f, g, o, a_g, pre_c, c, c_unclipped, clip_pass)):
            gates[name][t] = value

    cache = {
        "x": x, "W": W, "R": R, "activation": activation,
        "peephole": peephole, "coupled_gates": coupled_gates, "forget_bias": forget_bias,
        "cell_clip": cell_clip, "recurrent_mask": mask, "projection": projection, "layer_norm": ln,
        "zoneout": keep_h, "zoneout_cell": keep_c, "weight_mask": weight_mask, "R_used": R_used,
        "hs": hs, "cs": cs, "hms": hms, "ms": ms, "norms": norms, **gates,
    }
    return hs[1:].copy(), hs[T].copy(), cs[T].copy(), cache


def lstm_backward(cache, dy, dh_T, dc_T):
    """Backward through the window. Returns (dx, dh0, dc0, dW, dR, dbW, dbR, dP, dW_hr, d_layer_norm).

    dP is the [3, H] peephole gradient (row p_i is zero with coupled gates), or None without peephole; dW_hr
    the [P, H] projection's gradient, or None without a projection; d_layer_norm the gains' gradients by name
    (gamma_x, gamma_h, gamma_c, beta_c), or None without layer normalisation.
    """
    hs, cs, activation = cache["hs"], cache["cs"], cache["activation"]
    peephole, coupled, mask = cache["peephole"], cache["coupled_gates"], cache["recurrent_mask"]
    projection, ln = cache["projection"], cache["layer_norm"]
    keep_h, keep_c = cache["zoneout"], cache["zoneout_cell"]
    T, B, P, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2], cs.shape[2]
    G = 3 if coupled else 4
    dy = _as_f64("dy", dy, (T, B, P))
    dh_next = _as_f64("dh_T", dh_T, (B, P)).copy()
    dc_next = _as_f64("dc_T", dc_T, (B, H)).copy()
    dP = None if peephole is None else np.zeros((3, H))
    dW_hr = None if projection is None else np.zeros((P, H))
    d_ln = None if ln is None else {name: np.zeros_like(value) for name, value in ln.items()}

    da = np.zeros((T, B, G * H))  # the gradients of the pre-activations a
    da_in = np.zeros((T, B, G * H))  # ... of W x_t (before its layer norm)
    da_rec = np.zeros((T, B, G * H))  # ... of R h (likewise)
    for t in reversed(range(T)):
        i, f, g, o = cache["i"][t], cache["f"][t], cache["g"][t], cache["o"][t]
        c_prev, c, pre_c = cs[t], cache["c_cell"][t], cache["pre_c"][t]
        dh = dy[t] + dh_next
        dc_new = dc_next  # reaches the cell's new state c_t
        # zoneout: h_t = d h_{t-1} + (1 - d) h~_t, likewise c
        dh_kept = 0.0 if keep_h is None else keep_h[t] * dh
        dc_kept = 0.0 if keep_c is None else keep_c[t] * dc_new
        if keep_h is not None:
            dh = (1.0 - keep_h[t]) * dh
        if keep_c is not None:
            dc_new = (1.0 - keep_c[t]) * dc_new
        if projection is not None:
            # h_t = W_hr m_t: the gradient reaching m_t = o * act(c_t), and the projection's own
            dW_hr += dh.T @ cache["ms"][t]
            dh = dh @ projection
        # m_t = o * act(pre_c), pre_c = c_t or LN(c_t; gamma_c, beta_c)
        do = dh * _act(pre_c, activation)
        d_pre_c = dh * o * _act_grad(pre_c, activation)
        if ln is not None:
            d_pre_c, d_gamma, d_beta = _layer_norm_backward(d_pre_c, ln["gamma_c"], cache["norms"][t][2])
            d_ln["gamma_c"] += d_gamma
            d_ln["beta_c"] += d_beta
        dc = dc_new + d_pre_c
        # o = sigmoid(a_o + p_o * c_t): the o peephole sees the new (clipped) cell state
        da_o = do * o * (1.0 - o)
        if peephole is not None:
            dc = dc + da_o * peephole[2]
            dP[2] += (da_o * c).sum(axis=0)
        # c_t = clip(c_unclipped): gradient 1 strictly inside the bounds, 0 where clipped
        if cache["cell_clip"] is not None:
            dc = dc * cache["clip_pass"][t]
        # c_unclipped = f * c_{t-1} + i * g
        df = dc * c_prev
        di = dc * g
        dg = dc * i
        dc_next = dc * f + dc_kept
        if coupled:
            # i = 1 - f
            df = df - di
        # gate nonlinearities: f = sigmoid(a_f + p_f * c_{t-1} + forget_bias),
        # i = sigmoid(a_i + p_i * c_{t-1}), g = act(a_g)
        da_f = df * f * (1.0 - f)
        da_g = dg * _act_grad(cache["pre_g"][t], activation)
        if coupled:
            da[t] = np.concatenate([da_f, da_g, da_o], axis=1)
        else:
            da_i = di * i * (1.0 - i)
            da[t] = np.concatenate([da_i, da_f, da_g, da_o], axis=1)
        if peephole is not None:
            dc_next = dc_next + da_f * peephole[1]
            dP[1] += (da_f * c_prev).sum(axis=0)
            if not coupled:
                dc_next = dc_next + da_i * peephole[0]
                dP[0] += (da_i * c_prev).sum(axis=0)
        # a = LN(W x_t) + bW + LN(R (m_t * h_{t-1})) + bR (without layer norm, LN is the identity)
        da_in[t] = da_rec[t] = da[t]
        if ln is not None:
            da_in[t], d_gamma, _ = _layer_norm_backward(da[t], ln["gamma_x"], cache["norms"][t][0])
            d_ln["gamma_x"] += d_gamma
            da_rec[t], d_gamma, _ = _layer_norm_backward(da[t], ln["gamma_h"], cache["norms"][t][1])
            d_ln["gamma_h"] += d_gamma
        dh_next = _masked(da_rec[t] @ cache["R_used"], None if mask is None else mask[t]) + dh_kept

    x_rec = np.repeat(cache["hms"][:, :, None, :], G, axis=2)
    bias_grads = (da.sum(axis=(0, 1)), da.sum(axis=(0, 1)))
    dx, dW, dR, dbW, dbR = _weight_grads(cache, da_in, da_rec, x_rec, bias_grads)
    return dx, dh_next, dc_next, dW, dR, dbW, dbR, dP, dW_hr, d_ln


# ------------------------------------------------------------------------------------------------------ GRU


def gru_forward(x, W, R, bW, bR, h0, reset_after=True, activation="tanh", *, recurrent_mask=None,
                gamma_x=None, gamma_h=None, zoneout=None, weight_mask=None):
    """GRU window, gates r, z, n (z near 1 keeps the old state). Returns (y [T, B, H], h_T, cache).

    recurrent_mask: None or [T, B, H]; m_t * h_{t-1} replaces h_{t-1} wherever it meets R (R_r, R_z, R_n),
    while the output mix h_t = (1 - z) * n + z * h_{t-1} uses the unmasked h_{t-1}. gamma_x, gamma_h [3H]:
    layer normalisation of W x_t and of R h (reset_after only; n then uses the normalised R_n h inside
    r * (.)). zoneout [T, B, H]: the keep factors d of h_t = d h_{t-1} + (1 - d) h~_t. weight_mask [3H, H]:
    multiplies R elementwise (DropConnect).
    """
    x, W, R, bW, bR = _inputs(x, W, R, bW, bR, 3, activation)
    T, B, _ = x.shape
    H = R.shape[1]
    h0 = _as_f64("h0", h0, (B, H))
    mask = _recurrent_mask(recurrent_mask, (T, B, H))
    ln = _layer_norm_gains(3, H, gamma_x, gamma_h, lstm=False)
    if ln is not None and not reset_after:
        raise ValueError("layer norm: the GRU with reset_after=False has none (as in Haste)")
    keep = None if zoneout is None else _as_f64("zoneout", zoneout, (T, B, H))
    weight_mask = None if weight_mask is None else _as_f64("weight_mask", weight_mask, R.shape)
    R_used = R if weight_mask is None else R * weight_mask
    R_n = R_used[2 * H:]
    bR_n = bR[2 * H:]

    hs = np.zeros((T + 1, B, H))
    hs[0] = h0
    hms = np.zeros((T, B, H))
    gates = {name: np.zeros((T, B, H)) for name in ("r", "z", "n", "pre_n", "rec_n")}
    norms = []
    for t in range(T):
        h_prev = hs[t]
        hm = _masked(h_prev, None if mask is None else mask[t])  # what R sees: m_t * h_{t-1}
        ax = x[t] @ W.T
        saved = [None, None]
        if reset_after:
            ar = hm @ R_used.T
            if ln is not None:
                ax, saved[0] = _layer_norm(ax, ln["gamma_x"])
                ar, saved[1] = _layer_norm(ar, ln["gamma_h"])
            ax, ar = ax + bW, ar + bR
        else:
            ax, ar = ax + bW, hm @ R_used[:2 * H].T + bR[:2 * H]
        r = _sigmoid(ax[:, :H] + ar[:, :H])
        z = _sigmoid(ax[:, H:2 * H] + ar[:, H:2 * H])
        if reset_after:
            rec_n = ar[:, 2 * H:]  # (LN of) R_n (m_t * h_{t-1}) + bR_n, gated by r afterwards
            a_n = ax[:, 2 * H:] + r * rec_n
        else:
            rec_n = r * hm  # the recurrent input of the n block: r * m_t * h_{t-1}
            a_n = ax[:, 2 * H:] + rec_n @ R_n.T + bR_n
        n = _act(a_n, activation)
        h = (1.0 - z) * n + z * h_prev  # the unmasked h_{t-1}
        hs[t + 1], hms[t] = _zoneout(h_prev, h, None if keep is None else keep[t]), hm
        norms.append(saved)
        for name, value in (("r", r), ("z", z), ("n", n), ("pre_n", a_n), ("rec_n", rec_n)):
            gates[name][t] = value

    cache = {
        "x": x, "W": W, "R": R, "activation": activation, "reset_after": reset_after, "recurrent_mask": mask,
        "layer_norm": ln, "zoneout": keep, "weight_mask": weight_mask, "R_used": R_used,
        "hs": hs, "hms": hms, "norms": norms, **gates,
    }
    return hs[1:].copy(), hs[T].copy(), cache


def gru_backward(cache, dy, dh_T):
    """Backward through the window. Returns (dx, dh0, dW, dR, dbW, dbR, d_layer_norm), the last the gains'
    gradients by name (gamma_x, gamma_h), or None without layer normalisation."""
    hs, activation, reset_after = cache["hs"], cache["activation"], cache["reset_after"]
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    R, hms, ln, keep = cache["R_used"], cache["hms"], cache["layer_norm"], cache["zoneout"]
    R_r, R_z, R_n = R[:H], R[H:2 * H], R[2 * H:]
    dy = _as_f64("dy", dy, (T, B, H))
    dh_next = _as_f64("dh_T", dh_T, (B, H)).copy()
    d_ln = None if ln is None else {name: np.zeros_like(value) for name, value in ln.items()}

    da_in = np.zeros((T, B, 3 * H))
    da_rec = np.zeros((T, B, 3 * H))
    dbW, dbR = np.zeros(3 * H), np.zeros(3 * H)
    for t in reversed(range(T)):
        r, z, n, rec_n = cache["r"][t], cache["z"][t], cache["n"][t], cache["rec_n"][t]
        h_prev, hm = hs[t], hms[t]
        m = None if cache["recurrent_mask"] is None else cache["recurrent_mask"][t]
        dh = dy[t] + dh_next
        # zoneout: h_t = d h_{t-1} + (1 - d) h~_t
        dh_prev = 0.0 if keep is None else keep[t] * dh
        if keep is not None:
            dh = (1.0 - keep[t]) * dh
        # h~_t = (1 - z) * n + z * h_{t-1}  (unmasked h_{t-1})
        dn = dh * (1.0 - z)
        dz = dh * (h_prev - n)
        dh_prev = dh_prev + dh * z
        da_n = dn * _act_grad(cache["pre_n"][t], activation)
        da_z = dz * z * (1.0 - z)
        # below, every gradient with respect to hm = m_t * h_{t-1} reaches h_{t-1} through the mask
        if reset_after:
            # a_n = LN(W x_t)_n + bW_n + r * (LN(R hm)_n + bR_n)
            dr = da_n * rec_n
            da_r = dr * r * (1.0 - r)
            d_ax = np.concatenate([da_r, da_z, da_n], axis=1)
            d_ar = np.concatenate([da_r, da_z, da_n * r], axis=1)
            dbW += d_ax.sum(axis=0)
            dbR += d_ar.sum(axis=0)
            if ln is not None:
                d_ax, d_gamma, _ = _layer_norm_backward(d_ax, ln["gamma_x"], cache["norms"][t][0])
                d_ln["gamma_x"] += d_gamma
                d_ar, d_gamma, _ = _layer_norm_backward(d_ar, ln["gamma_h"], cache["norms"][t][1])
                d_ln["gamma_h"] += d_gamma
            dh_prev += _masked(d_ar @ R, m)
            da_in[t], da_rec[t] = d_ax, d_ar
        else:
            # a_n = W_n x_t + bW_n + R_n (r * hm) + bR_n
            drh = da_n @ R_n
            dr = drh * hm
            dh_prev += _masked(drh * r, m)
            da_r = dr * r * (1.0 - r)
            dh_prev += _masked(da_r @ R_r + da_z @ R_z, m)
            da_in[t] = da_rec[t] = np.concatenate([da_r, da_z, da_n], axis=1)
            dbW += da_in[t].sum(axis=0)
            dbR += da_rec[t].sum(axis=0)
        dh_next = dh_prev

    x_rec = np.stack([hms, hms, hms if reset_after else cache["rec_n"]], axis=2)
    dx, dW, dR, dbW, dbR = _weight_grads(cache, da_in, da_rec, x_rec, (dbW, dbR))
    return dx, dh_next, dW, dR, dbW, dbR, d_ln


# ------------------------------------------------------------------------------------------------------ RNN


def rnn_forward(x, W, R, bW, bR, h0, activation="tanh", *, recurrent_mask=None, weight_mask=None):
    """Elman RNN window, h_t = act(W x_t + bW + R (m_t * h_{t-1}) + bR). Returns (y [T, B, H], h_T, cache).

    recurrent_mask: None (m_t = 1) or [T, B, H]. weight_mask: None or [H, H], multiplies R (DropConnect).
    """
    x, W, R, bW, bR = _inputs(x, W, R, bW, bR, 1, activation)
    T, B, _ = x.shape
    H = R.shape[1]
    h0 = _as_f64("h0", h0, (B, H))
    mask = _recurrent_mask(recurrent_mask, (T, B, H))
    weight_mask = None if weight_mask is None else _as_f64("weight_mask", weight_mask, R.shape)
    R_used = R if weight_mask is None else R * weight_mask

    hs = np.zeros((T + 1, B, H))
    hs[0] = h0
    hms = np.zeros((T, B, H))
    pre = np.zeros((T, B, H))
    for t in range(T):
        hms[t] = _masked(hs[t], None if mask is None else mask[t])
        pre[t] = x[t] @ W.T + bW + hms[t] @ R_used.T + bR
        hs[t + 1] = _act(pre[t], activation)

    cache = {
        "x": x, "W": W, "R": R, "activation": activation, "recurrent_mask": mask, "hs": hs, "hms": hms,
        "pre_h": pre, "weight_mask": weight_mask, "R_used": R_used,
    }
    return hs[1:].copy(), hs[T].copy(), cache


def rnn_backward(cache, dy, dh_T):
    """Backward through the window. Returns (dx, dh0, dW, dR, dbW, dbR)."""
    hs, activation, mask = cache["hs"], cache["activation"], cache["recurrent_mask"]
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    dy = _as_f64("dy", dy, (T, B, H))
    dh_next = _as_f64("dh_T", dh_T, (B, H)).copy()

    da = np.zeros((T, B, H))
    for t in reversed(range(T)):
        dh = dy[t] + dh_next
        da[t] = dh * _act_grad(cache["pre_h"][t], activation)
        # a = W x_t + bW + R (m_t * h_{t-1}) + bR
        dh_next = _masked(da[t] @ cache["R_used"], None if mask is None else mask[t])

    dx, dW, dR, dbW, dbR = _weight_grads(cache, da, da, cache["hms"][:, :, None, :])
    return dx, dh_next, dW, dR, dbW, dbR


# ------------------------------------------------------------------------------------------------ dropout


_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


def dropout_mask(p, variational, seed, stream, shape):
    """The inverted-dropout mask [T, B, H] of Conveyor's counter-based generator (csrc/cells/dropout.h),
    written again with NumPy's uint64 arithmetic: element (t, b, u) is 0 when the uniform number drawn from
    (seed, stream, b, u, step) is below p, else 1 / (1 - p); step = t, or 0 for every t when variational."""
    T, B, H = shape
    steps = np.arange(T, dtype=np.uint64)[:, None, None] * np.uint64(0 if variational else 1)
    rows = np.arange(B, dtype=np.uint64)[None, :, None]
    units = np.arange(H, dtype=np.uint64)[None, None, :]
    with np.errstate(over="ignore"):
        z = _mix64(np.uint64(seed) + _GOLDEN)
        z = _mix64(z ^ np.uint64(stream))
        z = _mix64(z ^ rows)
        z = _mix64(z ^ units)
        z = _mix64(z ^ steps)
    uniform = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.where(uniform < p, 0.0, 1.0 / (1.0 - p))
