"""The training engine every task runs on: state layout, optimizer, step, loop and checkpoints."""
