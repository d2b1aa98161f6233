"""Keras 3 optimizers that clip gradients with clipcore.

Keras and TensorFlow are imported only by the function below, when called.
"""

__all__ = ["with_global_clipnorm"]


def _clip_gradients(self, grads):
    """Keras's gradient-clipping step, by clipcore's global norm."""
    import clipcore                 # looked up per trace: clipcore's function as it is then

    clipped, _ = clipcore.clip_by_global_norm(list(grads), self.clipcore_clipnorm)
    return clipped


def with_global_clipnorm(optimizer, clip_norm):
    """An optimizer like ``optimizer`` that clips gradients by their global norm with clipcore.

    Keras 3's ``BaseOptimizer.apply`` calls ``self._clip_gradients(grads)``
    just before the update step (inside the train step ``model.fit``
    compiles); Keras's own ``global_clipnorm`` is implemented there. The
    returned optimizer is a new instance, made from ``optimizer.get_config()``,
    of a subclass of ``type(optimizer)`` created on the fly whose
    ``_clip_gradients`` calls :func:`clipcore.clip_by_global_norm` (in graph
    mode: one clipcore call for all gradients in the compiled step). Everything
    else -- the update rule, its variables, serialization of the config, and
    ``isinstance`` checks -- is the original class's. (Wrapping
    ``apply_gradients`` instead would miss Keras's gradient accumulation, which
    clips in the same ``_clip_gradients``; changing ``optimizer.__class__`` in
    place would modify the caller's object.)

    Parameters
    ----------
    optimizer : keras.optimizers.Optimizer
        An optimizer not yet built, without ``clipnorm``, ``clipvalue`` or
        ``global_clipnorm`` of its own.
    clip_norm : float
        The maximum global L2 norm of the gradients, > 0.

    Returns
    -------
    keras.optimizers.Optimizer
        A new optimizer, an instance of a subclass of ``type(optimizer)``.

    Raises
    ------
    TypeError
        optimizer is not a Keras optimizer.
    ValueError
        clip_norm is not a finite number > 0; optimizer is already built or
        clips gradients itself.

    Examples
    --------
    >>> import keras, clipcore.keras
    >>> opt = clipcore.keras.with_global_clipnorm(keras.optimizers.SGD(1.0), 15)
    >>> isinstance(opt, keras.optimizers.SGD), opt.clipcore_clipnorm
    (True, 15.0)
    """
    import math

    import keras

    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"optimizer must be a Keras optimizer, got {type(optimizer).__name__}")
    try:
        c = float(clip_norm)
    except (TypeError, ValueError):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}") from None
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    if optimizer.built:
        raise ValueError("optimizer: already built (it has variables); pass a new one")
    for attr in ("clipnorm", "clipvalue", "global_clipnorm"):
        if getattr(optimizer, attr, None):
            raise ValueError(f"optimizer: has {attr}={getattr(optimizer, attr)} of its own; "
                             f"pass one without gradient clipping")
    base = type(optimizer)
    cls = type(f"ClipcoreGlobalClipnorm{base.__name__}", (base,),
               {"_clip_gradients": _clip_gradients, "__module__": __name__,
                "__doc__": f"{base.__name__} whose gradients clipcore clips by global norm."})
    new = cls.from_config(optimizer.get_config())
    new.clipcore_clipnorm = c
    return new
