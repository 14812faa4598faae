"""The tiny DINO-WM training run the trainer tests share (on franka_fixtures' small datasets).

32 px frames into a 28 px encoder input (2x2 patches), a 1-layer predictor of 2 heads x 16, frameskip 2,
2 context frames, 60 % of the episodes for training, batches of 4, no progress bar. A test appends what
it changes: a key given again on the command line overrides the earlier value.
"""
TINY_RUN = [
    "--data.img_size", "32", "--model.encoder_image_size", "28",
    "--model.predictor_depth", "1", "--model.predictor_heads", "2", "--model.predictor_dim_head", "16",
    "--model.predictor_mlp_dim", "64", "--data.frameskip", "2", "--data.num_hist", "2",
    "--data.split_ratio", "0.6", "--training.batch_size", "4", "--logging.progress_bar", "false",
]
