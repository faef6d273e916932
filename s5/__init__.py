"""The implementation behind `utils.py`, one module a subject.

    config           a run's configuration (recipes included): resolved, checked once, saved whole
    mnist            the MNIST files: fetch, verify, parse
    data             transforms, the classic and the fast loader
    device           device, precision, seeds, CPU memory reuse
    engine           optimizer, scheduler, loss, one training epoch, one evaluation, the epoch loop `fit`
    run              one training run from its configuration: folder, data, model, fit, outputs
    evaluation       model outputs over a loader, confusion matrix, worst mistakes
    receptive_field  how far each layer sees, derived from a forward pass
    files            atomic writes and run folders
    checkpoints      save, safe load, exact resume
    plots            sample grid, curves, confusion matrix, mistakes, predictions
    digits           your own images, preprocessed the way MNIST was made
    distributed      torchrun's processes: their context, the group, sums across processes
    demo             the draw-a-digit page (Gradio)
    cli              what the command-line entry points share: argument types, errors, exit codes

Imports point down only: nothing here imports `utils.py` or an entry point, and `model.py` imports nothing of
ours.
"""
