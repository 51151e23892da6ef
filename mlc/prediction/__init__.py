"""Predicting with a model: scores in this process (:mod:`scores`, which validation uses too), the files a
prediction writes (:mod:`submission`: predictions.csv, the Kaggle submission, and probabilities.csv), a table
predicted from a checkpoint alone and the trained network loaded back (:mod:`checkpoints`), and a file that
scores without mlc (:mod:`export`: TorchScript or ONNX).

May import: io, data, model, eval and the top-level config, errors and logs; never train or Ray."""
