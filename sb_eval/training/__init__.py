"""Training small stick-breaking and softmax models (trainer) on synthetic tasks, offline text and
retrieval practice (retrieval)."""
