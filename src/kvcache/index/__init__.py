"""Block index backends behind the narrow `Index` protocol."""
