"""megafusion.training"""
