"""The implementation behind `utils.py` and the entry points, one module a subject.

    config           every setting defined once (type, range, help): recipes and a run's configuration
    errors           the one kind of user error: one line, an exit code
    mnist, data      the MNIST files (fetch, verify, parse); transforms, the classic and the fast loader
    device           device, precision, seeds, CPU memory reuse
    optim, loop      a recipe's optimizer, schedule and loss; the step, the epoch, the evaluation
    run, callbacks   one run's state and its epoch loop; what it writes after each epoch and at the end
    checkpoints      save, safe load, exact resume; files: atomic writes and run folders
    evaluation       model outputs over a loader, test-time shifts, confusion matrix, worst mistakes
    plots, receptive_field, tensorboard   the figures; how far each layer sees; TensorBoard logs
    digits, demo, export    your own images; the draw-a-digit page (Gradio); the Net as ONNX
    distributed, sweep, cli torchrun's processes; a recipe over seeds; what the entry points share

Imports point down only: nothing here imports `utils.py` or an entry point; `model.py` imports nothing of ours.
"""
