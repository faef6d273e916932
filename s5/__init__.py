"""The implementation behind `utils.py` and the entry points, one module a subject. Imports point down only: nothing
here imports `utils.py` or an entry point; `model.py` imports nothing of ours.

    config, errors        every setting defined once (type, range, help); the one kind of user error
    mnist, data           the MNIST files (fetch, verify, parse); transforms, the classic and the fast loader
    device, distributed   device, precision, seeds, CPU memory reuse; torchrun's processes
    optim, loop           a recipe's optimizer, schedule and loss; the step, the epoch, the evaluation
    run, callbacks        one run's state and its epoch loop; what it writes after each epoch and at the end
                          (checkpoints, metrics, figures, TensorBoard logs)
    checkpoints, files    save, safe load, exact resume; atomic writes and run folders
    evaluation, plots     model outputs over a loader, test-time shifts, confusion matrix, mistakes; the figures
    receptive_field       how far each layer sees
    digits, demo, export  your own images; the draw-a-digit page (Gradio); the Net as ONNX
    cli                   what the entry points share
    startup               imported first by each entry point: a signal while torch loads is one line
"""
