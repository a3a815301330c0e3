from stdit.cli import main

main()
