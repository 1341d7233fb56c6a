"""What attention does inside a model: how far back each head looks (attention_stats), measured
on stick-breaking models from the kernels' fused statistics and on softmax models from a blocked
pass, never from a T x T matrix."""
