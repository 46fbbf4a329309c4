"""charlm: train, sample and evaluate recurrent (LSTM/GRU/RNN) language models from the command line."""

__version__ = "0.1.0"
