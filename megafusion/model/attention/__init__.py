"""megafusion.model.attention"""
