"""The implementation behind `utils.py`, one module a subject.

    data             verified MNIST files, transforms, the classic and the fast loader
    device           device, precision, seeds, CPU memory reuse
    engine           optimizer, scheduler, loss, recipes, the train/test loops and the epoch loop `fit`
    evaluation       model outputs over a loader, confusion matrix, worst mistakes
    receptive_field  how far each layer sees, derived from a forward pass
    files            atomic writes and run folders
    checkpoints      save, safe load, exact resume
    plots            sample grid, curves, confusion matrix, mistakes, predictions
    digits           your own images, preprocessed the way MNIST was made
    cli              what the command-line entry points share: argument types, errors, exit codes

Imports point down only: nothing here imports `utils.py` or an entry point, and `model.py` imports nothing of
ours.
"""
