from partdistill.cli import main

main()
