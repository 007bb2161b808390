"""Task plugins: evaluate a trained model on a dataset split."""
