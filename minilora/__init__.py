"""minilora"""
