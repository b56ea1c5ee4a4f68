"""What `w2sr report` computes and draws: the numbers, the Markdown tables and the figures."""
